import fcntl
import functools
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap
import threading

import numpy as np
import pytest
import torch
from gpu_switch import pytest_runtest_makereport  # noqa: F401 (the hook: PERSIMMON_REQUIRE_GPU=1)

from persimmon_export.demo import train_tokenizer
from persimmon_export.deploy.genai import GENAI_CONFIG_FILE

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Texts that break tokenizers: emoji (4-byte UTF-8 via byte fallback), CJK, control characters,
# runs of spaces and newlines, leading/trailing spaces, special-token text, the empty string.
TRICKY_TEXTS = [
    "",
    " ",
    "  ",
    "hello",
    " hello",
    "hello ",
    "Hello world, this is a test.",
    "human: What is the capital of France?\n\nadept: Paris.",
    "line one\nline two\n\n\nline five",
    "\n\n",
    "tabs\tand\t\tmore\ttabs",
    "many     spaces   here",
    "emoji 🎉🦄 and skin tone 👍🏽 and ZWJ 👨‍👩‍👧",
    "東京は日本の首都です。",
    "mixed 日本語 and English 123",
    "control \x00\x01\x02\x1b[31m chars \x7f",
    "|ENDOFTEXT|",
    "before |ENDOFTEXT| after",
    "<s> </s> <unk> <0x41>",
    "rare ǅ ß Ω ∑ ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="session", autouse=True)
def private_verification_records(tmp_path_factory):
    """Loads remember verified builds per user: keep the suite's records out of ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PERSIMMON_CACHE_DIR", str(tmp_path_factory.mktemp("verification-records")))
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Persimmon checkpoint (HF layout, with tokenizer files); tests must not change it."""
    from persimmon_export.demo import make_demo_checkpoint

    return make_demo_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"), seed=4)


@pytest.fixture(scope="session")
def tiny_build(tiny_checkpoint, tmp_path_factory):
    """Its float32 onnxruntime build (max_batch 2, kv_capacity 96); tests must not change it."""
    from persimmon_export.build import build
    from persimmon_export.options import BuildOptions

    out = str(tmp_path_factory.mktemp("build") / "b")
    build(tiny_checkpoint, out, BuildOptions(dtype="float32", max_batch=2, kv_capacity=96, backend="onnxruntime"))
    return out


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A sentencepiece Unigram model, byte fallback, `|ENDOFTEXT|` as a control piece."""
    return train_tokenizer(str(tmp_path_factory.mktemp("sp") / "tokenizer.model"))


@pytest.fixture(scope="session")
def sp_model_user_defined(tmp_path_factory):
    """Same, but `|ENDOFTEXT|` is a user-defined piece (sentencepiece matches it inside text)."""
    return train_tokenizer(str(tmp_path_factory.mktemp("sp_ud") / "tokenizer.model"), special_as_user_defined=True)


_BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked: a serving host has none")
sys.meta_path.insert(0, NoTorch())
"""


def run_together(work, threads: int, timeout_s: float = 300) -> list[Exception]:
    """Run work(i) for i in range(threads) on threads released at the same moment; return the
    exceptions they raised (a thread's exception would otherwise vanish)."""
    start, errors = threading.Barrier(threads), []

    def run(i):
        try:
            start.wait(timeout=60)
            work(i)
        except Exception as e:
            errors.append(e)

    running = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(timeout=timeout_s)
    return errors


def transformers_checkpoint(out_dir: str, tokenizer, hf_class=None, seed: int = 0, init=None, **fields):
    """A tiny checkpoint written by transformers itself: `hf_class` (default PersimmonForCausalLM)
    with its own initialisation under `seed` (then `init(model)`, if given, under no_grad), saved by
    its save_pretrained, with `tokenizer`'s files (persimmon_export.load.checkpoint.tokenizer_files).
    `fields` override the tiny config's. Returns the model."""
    import torch
    import transformers

    from persimmon_export.load.checkpoint import tokenizer_files

    config = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, bos_token_id=tokenizer.bos_id,
                  eos_token_id=tokenizer.bos_id)
    torch.manual_seed(seed)
    model = (hf_class or transformers.PersimmonForCausalLM)(transformers.PersimmonConfig(**{**config, **fields})).eval()
    if init is not None:
        with torch.no_grad():
            init(model)
    model.save_pretrained(out_dir)
    for name, content in tokenizer_files(tokenizer).items():
        if isinstance(content, str):
            with open(content, "rb") as f:
                content = f.read()
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(content)
    return model


def error_line(stderr) -> str:
    """The one error line of a refused command: the last line of stderr. Lines before it, if any,
    are our log lines (progress and notes, which -q turns off), never a traceback or another error."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    lines = text.strip().splitlines()
    assert lines and "Traceback" not in text, text
    assert [line for line in lines if ": error: " in line] == lines[-1:], text
    return lines[-1]


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where importing torch fails; it must not import torch."""
    code = _BLOCK_TORCH + textwrap.dedent(code) + '\nassert "torch" not in sys.modules\n'
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def without_permission_override() -> list[str]:
    """A command prefix under which file permissions apply: root ignores them, so drop the
    capabilities that let it (tests run as root in CI)."""
    import shutil

    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root and setpriv (util-linux) is missing to drop CAP_DAC_OVERRIDE")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


@pytest.fixture
def terminal(monkeypatch):
    """Call it in the test (pytest resets sys.stderr between phases) to make sys.stderr a
    120-column pseudo-terminal; it returns `shown()`, which ends the terminal and returns what
    reached it."""
    controller, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    screen = os.fdopen(slave, "w")
    received = []
    reader = threading.Thread(target=lambda: received.extend(iter(lambda: read_terminal(controller), b"")))
    reader.start()  # drained as it is written: a full terminal buffer would block the writer

    def shown() -> str:
        screen.close()  # the reader then gets EIO after the last byte
        reader.join(timeout=30)
        return b"".join(received).decode()

    def attach():
        monkeypatch.setattr("sys.stderr", screen)
        return shown
    yield attach
    if not screen.closed:
        shown()
    os.close(controller)


def read_terminal(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # EIO: every writer has closed the terminal
        return b""


def make_overflow_build(root: str) -> str:
    """A float32 build of finite weights whose logits overflow float32 (an lm_head near float32's
    largest value): the generator must refuse the non-finite logits, and servers answer that error."""
    from safetensors.numpy import load_file, save_file

    from persimmon_export.build import build
    from persimmon_export.demo import make_demo_checkpoint
    from persimmon_export.options import BuildOptions

    checkpoint = make_demo_checkpoint(os.path.join(root, "ckpt"), seed=6)
    weights_file = os.path.join(checkpoint, "model.safetensors")
    weights = load_file(weights_file)
    weights["lm_head.weight"] = np.full_like(weights["lm_head.weight"], 3e38)
    save_file(weights, weights_file, metadata={"format": "pt"})
    out = os.path.join(root, "build")
    build(checkpoint, out, BuildOptions(dtype="float32", backend="onnxruntime", max_batch=1, kv_capacity=64))
    return out


@functools.lru_cache(maxsize=None)
def _og_model(directory: str):
    import onnxruntime_genai as og

    return og.Model(directory)


def og_greedy(directory: str, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    """onnxruntime-genai's greedy tokens for each row of a build (one batch, right-padded with the
    pad id of its genai_config.json, as onnxruntime-genai pads)."""
    import onnxruntime_genai as og

    with open(os.path.join(directory, GENAI_CONFIG_FILE)) as f:
        pad = json.load(f)["model"]["pad_token_id"]
    width = max(map(len, rows))
    model = _og_model(directory)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=width + new_tokens, do_sample=False, batch_size=len(rows))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([row + [pad] * (width - len(row)) for row in rows], np.int32))
    out = [[] for _ in rows]
    for _ in range(new_tokens):
        generator.generate_next_token()
        for row, token in zip(out, generator.get_next_tokens()):
            row.append(int(token))
    return out
