"""Hostile checkpoints: nothing in a file we are given runs, and each one gets one clear error line.

Every trojan here is first shown to be live (plain pickle or torch.load(weights_only=False) runs it
and creates a marker file), then fed to `persimmon-export convert` / `iter_tensors`, which must
refuse it with exit status 2, exactly one stderr line, no marker, no output directory.
"""

import argparse
import collections
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import error_line
from test_convert import HEADS, HIDDEN, LAYERS, VOCAB, megatron_tree

from persimmon_export import PersimmonConfig
from persimmon_export.cli import main
from persimmon_export.demo import random_model
from persimmon_export.load.checkpoint import CheckpointError, iter_tensors
from persimmon_export.load.convert import load_megatron
from persimmon_export.load.safe_pickle import MAX_MEMO, Placeholder, load
from persimmon_runtime.errors import PersimmonError

P2 = b"\x80\x02"


def text(value: str) -> bytes:  # BINUNICODE
    data = value.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def short_text(value: str) -> bytes:  # SHORT_BINUNICODE (protocol 4)
    data = value.encode()
    return b"\x8c" + bytes([len(data)]) + data


def global_(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def call(function: bytes, *args: bytes) -> bytes:
    return function + b"(" + b"".join(args) + b"tR"


def long1(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def write_code(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def trojans(marker) -> dict[str, bytes]:
    """Pickle bodies (no PROTO, no STOP) that create `marker` under the standard unpickler."""
    code = write_code(marker)
    touch = f"touch {marker}"
    return {
        "builtins.eval": call(global_("builtins", "eval"), text(code)),
        "builtins.exec": call(global_("builtins", "exec"), text(code)),
        "py2 __builtin__.eval": call(global_("__builtin__", "eval"), text(code)),
        "os.system": call(global_("os", "system"), text(touch)),
        "posix.system": call(global_("posix", "system"), text(touch)),
        "subprocess.call": call(global_("subprocess", "call"), b"(" + text("sh") + text("-c") + text(touch) + b"t"),
        # the exploit: STACK_GLOBAL resolves dotted names through an allowed function
        "dotted __builtins__": short_text("torch._utils") + short_text("_rebuild_tensor.__builtins__.get") + b"\x93"
                               + b"(" + short_text("exec") + b"tR" + b"(" + short_text(code) + b"tR",
        "dotted module attribute": short_text("torch.serialization") + short_text("os.system") + b"\x93"
                                   + b"(" + short_text(touch) + b"tR",
    }


class Evil:
    def __init__(self, marker, via_exec):
        self.marker, self.via_exec = marker, via_exec

    def __reduce__(self):
        if self.via_exec:
            return exec, (write_code(self.marker),)
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------- file formats


def zip_checkpoint(path, data_pkl: bytes, base) -> None:
    """A genuine torch zip archive: `base`'s records with data.pkl replaced."""
    reader = torch._C.PyTorchFileReader(str(base))
    writer = torch._C.PyTorchFileWriter(str(path))
    for name in reader.get_all_records():
        if name not in ("version", ".data/serialization_id"):  # the writer adds these itself
            data = data_pkl if name == "data.pkl" else reader.get_record(name)
            writer.write_record(name, data, len(data))
    writer.write_end_of_file()


def legacy_checkpoint(path, main_pickle: bytes) -> None:
    """The pre-1.6 (_use_new_zipfile_serialization=False) layout around `main_pickle`, no storages."""
    header = [torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
              {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}]
    with open(path, "wb") as f:
        for item in header:
            f.write(pickle.dumps(item, protocol=2))
        f.write(main_pickle + pickle.dumps([], protocol=2))


def data_pkl(path) -> bytes:
    return torch._C.PyTorchFileReader(str(path)).get_record("data.pkl")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory, sp_model):
    """An adept-style checkpoint made only of importable classes (so torch.load(weights_only=False)
    of a spliced copy runs the trojan *and* returns the checkpoint) plus its tokenizer."""
    root = tmp_path_factory.mktemp("base")
    config = PersimmonConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                             intermediate_size=192, max_position_embeddings=2048)
    state = random_model(config, seed=3, dtype=torch.float32).state_dict()
    inv_freq = 1.0 / (25000.0 ** (torch.arange(0, config.rotary_dims, 2).float() / config.rotary_dims))
    args = argparse.Namespace(num_attention_heads=HEADS, seq_length=2048, layernorm_epsilon=1e-5)
    ckpt = {"args": args, "iteration": 10, "model": megatron_tree(state, inv_freq),
            "rng_state": [{"torch_rng_state": torch.get_rng_state()}]}
    torch.save(ckpt, root / "model_optim_rng.pt")
    torch.save(ckpt, root / "legacy.pt", _use_new_zipfile_serialization=False)
    tokenizer = root / "adept_vocab.model"
    tokenizer.write_bytes(open(sp_model, "rb").read())
    return root / "model_optim_rng.pt", tokenizer


def convert(tmp_path, checkpoint, tokenizer, capsys, monkeypatch):
    """`persimmon-export convert` in-process (cwd = tmp_path): (exit status, stderr lines)."""
    monkeypatch.chdir(tmp_path)  # where a legacy 'module' persistent id would drop its .patch file
    capsys.readouterr()
    status = main(["convert", str(checkpoint), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    return status, [error_line(err)] if status else err.splitlines()


def assert_refused(tmp_path, checkpoint, tokenizer, capsys, monkeypatch, marker=None, reason=""):
    status, lines = convert(tmp_path, checkpoint, tokenizer, capsys, monkeypatch)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"persimmon-export convert: error: {checkpoint}: ") and reason in lines[0], lines[0]
    assert marker is None or not os.path.exists(marker)
    assert not os.path.exists(tmp_path / "hf") and not list(tmp_path.glob("*.patch"))
    return lines[0]


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "pwned"


def assert_live(marker, run) -> None:
    """The trojan really runs outside our loader (so the refusal test below can fail)."""
    try:
        run()
    except Exception:
        pass  # some trojans break the surrounding load after they ran
    assert marker.exists()
    marker.unlink()


# ---------------------------------------------------------------- code execution


@pytest.mark.parametrize("name", list(trojans("m")))
@pytest.mark.parametrize("layout", ["bare", "zip", "legacy", "spliced into a real checkpoint"])
def test_trojans_never_run(name, layout, base, tmp_path, marker, capsys, monkeypatch):
    real, tokenizer = base
    body = trojans(marker)[name]
    protocol = b"\x80\x04" if body.startswith(b"\x8c") else P2
    pt = tmp_path / "model_optim_rng.pt"
    if layout == "bare":  # the 150-byte model_optim_rng.pt
        pt.write_bytes(protocol + body + b".")
        assert_live(marker, lambda: pickle.loads(pt.read_bytes()))
    elif layout == "zip":
        zip_checkpoint(pt, protocol + body + b".", real)
        assert_live(marker, lambda: torch.load(pt, weights_only=False))
    elif layout == "legacy":
        legacy_checkpoint(pt, protocol + body + b".")
        assert_live(marker, lambda: torch.load(pt, weights_only=False))
    else:  # the trojan's result stays on the stack; the real data.pkl's STOP returns the real checkpoint
        zip_checkpoint(pt, protocol + body + data_pkl(real)[2:], real)
        loaded = {}
        assert_live(marker, lambda: loaded.update(torch.load(pt, weights_only=False)))
        assert "model" in loaded  # the file would also have converted
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, marker)


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("via_exec", [False, True], ids=["os.system", "exec"])
def test_every_pickle_protocol(protocol, via_exec, base, tmp_path, marker, capsys, monkeypatch):
    real, tokenizer = base
    trojan = pickle.dumps({"model": {}, "optimizer": Evil(marker, via_exec)}, protocol=protocol)
    assert_live(marker, lambda: pickle.loads(trojan))
    for layout in (zip_checkpoint, legacy_checkpoint):
        pt = tmp_path / f"{layout.__name__}.pt"
        layout(pt, trojan, real) if layout is zip_checkpoint else layout(pt, trojan)
        assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, marker)


def test_subprocess_cli_one_line(base, tmp_path, marker):
    real, tokenizer = base
    pt = tmp_path / "model_optim_rng.pt"
    pt.write_bytes(P2 + trojans(marker)["os.system"] + b".")
    cli = os.path.join(os.path.dirname(sys.executable), "persimmon-export")
    done = subprocess.run([cli, "convert", str(pt), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "hf")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and error_line(done.stderr), done.stderr
    assert "refused to load: it calls os.system" in done.stderr
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_the_real_checkpoints_still_convert(base, tmp_path, capsys, monkeypatch):
    real, tokenizer = base
    for pt in (real, real.parent / "legacy.pt"):
        status, lines = convert(tmp_path, pt, tokenizer, capsys, monkeypatch)
        assert status == 0, lines
        os.rename(tmp_path / "hf", tmp_path / f"hf-{pt.stem}")


def test_foreign_classes_are_inert_placeholders(base, tmp_path, marker, capsys, monkeypatch):
    """A class we do not know (here a made-up Megatron one) is never imported or called: the file
    converts, and its arguments and state are only recorded."""
    real, tokenizer = base
    payload = call(global_("megatron.evil", "Runner"), text(write_code(marker)))
    state = b"}" + text("__setstate__") + global_("megatron.evil", "Runner") + b"s"  # cannot shadow a method
    pt = tmp_path / "model_optim_rng.pt"
    zip_checkpoint(pt, P2 + payload + state + b"b" + state + b"b" + data_pkl(real)[2:], real)
    status, lines = convert(tmp_path, pt, tokenizer, capsys, monkeypatch)
    assert status == 0 and not marker.exists(), lines

    zip_checkpoint(pt, P2 + payload + state + b"b" + state + b"b.", real)
    runner = load(pt, foreign_classes=True)
    assert isinstance(runner, Placeholder) and runner.args == (write_code(marker),)
    assert isinstance(runner.state["__setstate__"], type) and not marker.exists()


# ---------------------------------------------------------------- BUILD and persistent ids


@pytest.mark.parametrize("module, name, reason", [
    ("argparse", "Namespace", "changes the class argparse.Namespace itself"),
    ("collections", "Counter", "calls collections.Counter")])  # (allowed by torch, not by us)
def test_build_cannot_mutate_a_class(module, name, reason, base, tmp_path, capsys, monkeypatch):
    real, tokenizer = base
    cls = getattr(sys.modules[module], name)
    body = global_(module, name) + b"N}" + text("persimmon_pwned") + b"\x88s\x86b"  # BUILD (None, slots)
    pickle.loads(P2 + body + b".")  # live: the standard unpickler sets a class attribute
    assert cls.persimmon_pwned is True
    del cls.persimmon_pwned
    pt = tmp_path / "model_optim_rng.pt"
    zip_checkpoint(pt, P2 + body + data_pkl(real)[2:], real)
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason=reason)
    assert not hasattr(cls, "persimmon_pwned")


@pytest.mark.filterwarnings("ignore::torch.serialization.SourceChangeWarning")  # the live run's
def test_legacy_module_persistent_id_writes_no_patch(base, tmp_path, capsys, monkeypatch):
    """The issue's attack: BUILD sets Namespace.dump_patches, then a legacy 'module' id makes
    torch diff the class source and write Namespace.patch into the working directory."""
    real, tokenizer = base
    main_pickle = (P2 + global_("argparse", "Namespace") + b"q\x00" + b"N}" + text("dump_patches") + b"\x88s\x86b"
                   + b"(" + text("module") + b"h\x00" + text("argparse.py") + text("changed") + b"tQ.")
    pt = tmp_path / "model_optim_rng.pt"
    legacy_checkpoint(pt, main_pickle)
    monkeypatch.chdir(tmp_path)
    try:
        torch.load(pt, weights_only=False)  # live: the patch file appears
        assert (tmp_path / "Namespace.patch").exists()
    finally:
        if "dump_patches" in vars(argparse.Namespace):
            del argparse.Namespace.dump_patches
    (tmp_path / "Namespace.patch").unlink()
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason="changes the class argparse.Namespace")
    assert "dump_patches" not in argparse.Namespace.__dict__
    legacy_checkpoint(pt, main_pickle.replace(b"N}" + text("dump_patches") + b"\x88s\x86b", b""))  # the id alone
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason="persistent id other than a tensor storage")


def test_module_persistent_id_in_zip(base, tmp_path, capsys, monkeypatch):
    real, tokenizer = base
    pt = tmp_path / "model_optim_rng.pt"
    zip_checkpoint(pt, P2 + b"(" + text("module") + global_("argparse", "Namespace") + text("a.py") + text("x")
                   + b"tQ.", real)
    line = assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch)
    assert "persistent id other than a tensor storage" in line


@pytest.mark.parametrize("module, name", [
    ("builtins", "bytearray"), ("torch", "Tensor"), ("torch", "FloatTensor"), ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_sparse_tensor"), ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "load"),
    ("copyreg", "_reconstructor"), ("functools", "partial"), ("operator", "attrgetter")])
def test_only_the_tensor_rebuilding_globals(module, name, base, tmp_path, capsys, monkeypatch):
    """torch's weights_only allow-list has allocating constructors (torch.Tensor(n), bytearray(n));
    ours is the exact (module, name) set a checkpoint's tensors need."""
    real, tokenizer = base
    pt = tmp_path / "model_optim_rng.pt"
    zip_checkpoint(pt, P2 + call(global_(module, name), long1(2**40)) + data_pkl(real)[2:], real)
    line = assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch)
    assert f"{module}.{name}" in line


# ---------------------------------------------------------------- resource limits


def shared_dicts(levels: int) -> dict:
    d = {}
    for _ in range(levels):
        d = {"a": d, "b": d}
    return d


def list_bomb() -> bytes:
    """1-2 KB: nine levels of lists holding the level below ten times (10**9 elements if expanded)."""
    body = b"]q\x00"
    for level in range(1, 10):
        body += b"]q" + bytes([level]) + b"(" + (b"h" + bytes([level - 1])) * 10 + b"e"
    return body


def tuple_bomb(levels: int) -> bytes:
    """t = (t, t) `levels` times: hashing it walks 2**levels tuples."""
    body = b")q\x00"
    for level in range(levels):
        body += b"h" + bytes([level]) + b"h" + bytes([level]) + b"\x86q" + bytes([level + 1])
    return body


def deep(opening: bytes, closing: bytes, depth: int = 100_000) -> bytes:
    return opening * depth + closing * depth


BOMBS = {
    # name: (data.pkl, words the error names)
    "billion laughs (lists)": (P2 + b"}" + text("model") + b"}" + text("x") + b"(" + list_bomb() + b"tss.",
                               "billion laughs"),
    "tuple bomb as a dict key": (P2 + b"}" + tuple_bomb(60) + b"Ns.", "billion laughs"),
    "set of a tuple bomb": (P2 + call(global_("builtins", "set"), b"]" + tuple_bomb(60) + b"a") + b".",
                            "billion laughs"),
    # each dict is within bounds (2**20 tuples), but torch would hash that key once per dict
    "a big key hashed twice": (P2 + tuple_bomb(19) + b"}h\x13Ns}h\x13Ns.", "hash"),
    "100k nested lists": (P2 + deep(b"]", b"a")[:-1] + b".", "deep"),
    "100k nested tuples": (P2 + deep(b"(", b"t") + b".", "deep"),
    "100k nested dicts": (P2 + b"}" + b"".join([text("k") + b"}"] * 100_000) + b"s" * 100_000 + b".", "deep"),
    "deep tuple as a dict key": (P2 + b"}" + deep(b"(", b"t", 50_000) + b"Ns.", "deep"),
    "reference cycle": (P2 + b"]q\x00h\x00a" + b".", "cycle"),
    "4 GiB string in a small file": (P2 + b"X\xff\xff\xff\xff" + b"x" * 100 + b".", "4294967295-byte string"),
    "truncated string": (P2 + b"X\x00\x01\x00\x00abc", "truncated"),
    "pickle protocol 5": (b"\x80\x05" + text("x") + b".", "protocol 5"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_resource_bombs_fail_fast_with_one_line(name, base, tmp_path, capsys, monkeypatch):
    real, tokenizer = base
    pickled, reason = BOMBS[name]
    pt = tmp_path / "model_optim_rng.pt"
    zip_checkpoint(pt, pickled, real)
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason=reason)
    legacy_checkpoint(pt, pickled)
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason=reason)


def test_shared_dict_model_from_torch_save(base, tmp_path, capsys, monkeypatch):
    """A "billion laughs" that torch.save itself writes (40 levels of one shared dict, < 1 KB)."""
    real, tokenizer = base
    pt = tmp_path / "model_optim_rng.pt"
    torch.save({"model": shared_dicts(40)}, pt)
    assert pt.stat().st_size < 2000
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason="billion laughs")


def test_memo_limit(base, tmp_path, capsys, monkeypatch):
    real, tokenizer = base
    pt = tmp_path / "model_optim_rng.pt"
    puts = b"".join(b"r" + i.to_bytes(4, "little") for i in range(MAX_MEMO + 1))
    zip_checkpoint(pt, P2 + b"N" + puts + b".", real)
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason=f"memoizes more than {MAX_MEMO}")


def storage_tensor(numel: int, size: int) -> bytes:
    """data.pkl of {"model": {"w": tensor}} over storage "0" (the base's first storage) as torch writes it."""
    pid = b"(" + text("storage") + global_("torch", "FloatStorage") + text("0") + text("cpu") + long1(numel) + b"tQ"
    tensor = call(global_("torch._utils", "_rebuild_tensor_v2"), pid, b"K\x00", long1(size) + b"\x85",
                  b"K\x01\x85", b"\x89", call(global_("collections", "OrderedDict")))
    return P2 + b"}" + text("model") + b"}" + text("w") + tensor + b"ss."


@pytest.mark.parametrize("numel, size, reason", [
    (10**12, 4, "declares 1000000000000 elements"),  # a storage larger than the file
    (2**2000, 4, "elements, more than the file"),
    (4, 10**6, "cannot read the checkpoint (RuntimeError"),  # a tensor larger than its storage
])
def test_declared_sizes(numel, size, reason, base, tmp_path, capsys, monkeypatch):
    real, tokenizer = base
    pt = tmp_path / "model_optim_rng.pt"
    zip_checkpoint(pt, storage_tensor(numel, size), real)
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason=reason)


def test_compressed_record_bomb(base, tmp_path, capsys, monkeypatch):
    """torch's zip reader inflates deflated records: a small file must not declare a huge one."""
    real, tokenizer = base
    pt = tmp_path / "model_optim_rng.pt"
    with zipfile.ZipFile(real) as source, zipfile.ZipFile(pt, "w") as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"little" + b"\x00" * 2**22
            out.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    assert pt.stat().st_size < 2**20
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason="more than the whole file")


def test_hostile_args_values(base, tmp_path, capsys, monkeypatch):
    real, tokenizer = base
    for value in ("64", -4, 0, 1e300, float("nan"), True, 2**70):
        pt = tmp_path / "model_optim_rng.pt"
        ckpt = torch.load(real, weights_only=False)
        ckpt["args"].num_attention_heads = value
        torch.save(ckpt, pt)
        assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason="args.num_attention_heads is")


def test_load_megatron_args_are_validated_fields_only(base):
    real, _ = base
    args = load_megatron(str(real))["args"]
    assert vars(args) == {"num_attention_heads": HEADS, "seq_length": 2048, "layernorm_epsilon": 1e-5}


# ---------------------------------------------------------------- pytorch_model.bin (iter_tensors)


def test_pytorch_model_bin(base, tmp_path, marker):
    real, _ = base
    state = collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3))
    for legacy in (False, True):  # both torch.save formats load
        good = tmp_path / f"good-{legacy}.bin"
        torch.save(state, good, _use_new_zipfile_serialization=not legacy)
        assert torch.equal(dict(iter_tensors(str(good)))["w"], state["w"])

    bad = tmp_path / "pytorch_model.bin"
    cases = {
        "refused to load: it calls builtins.exec": P2 + trojans(marker)["builtins.exec"] + b".",
        "refused to load: it holds a argparse.Namespace object, and a weights file holds only tensors":
            pickle.dumps({"w": argparse.Namespace()}, protocol=2),
        "refused to load: it holds a megatron.x.Y object": P2 + call(global_("megatron.x", "Y")) + b".",
        "billion laughs": pickle.dumps(shared_dicts(40), protocol=2),
        "nests objects more than": P2 + deep(b"(", b"t") + b".",
        "entry 'w' holds a int, not a tensor": pickle.dumps({"w": 3}, protocol=2),
    }
    for reason, pickled in cases.items():
        zip_checkpoint(bad, pickled, real)
        with pytest.raises(CheckpointError, match="pytorch_model.bin: ") as error:
            list(iter_tensors(str(bad)))
        assert reason in str(error.value) and "\n" not in str(error.value)
        assert not marker.exists()


@pytest.mark.parametrize("key, value, reason", [
    ("model.layers.0.self_attn.q_layernorm.weight", torch.ones(0), "non-empty 1-D tensor"),
    ("model.layers.0.self_attn.q_layernorm.weight", torch.ones(7), "does not divide the hidden size"),
    ("model.layers.0.self_attn.q_layernorm.weight", torch.ones(2, 2), "non-empty 1-D tensor"),
    ("model.embed_tokens.weight", torch.ones(VOCAB), "non-empty 2-D tensor"),
    ("model.layers.0.mlp.dense_h_to_4h.weight", torch.ones(3), "non-empty 2-D tensor"),
])
def test_hostile_tensor_shapes_are_one_line(key, value, reason, base, tmp_path, capsys, monkeypatch):
    ckpt = torch.load(base[0], weights_only=False)
    tree = ckpt["model"]["language_model"]
    if key.startswith("model.embed_tokens"):
        tree["embedding"]["word_embeddings"]["weight"] = value
    else:
        tree["encoder"][key.removeprefix("model.").replace("self_attn", "self_attention")] = value
    torch.save(ckpt, tmp_path / "model_optim_rng.pt")
    assert_refused(tmp_path, tmp_path / "model_optim_rng.pt", base[1], capsys, monkeypatch, reason=reason)


def test_byte_amplification_through_codecs_encode(base, tmp_path, capsys, monkeypatch):
    """One memoized 1 MiB string encoded 1000 times would allocate 1 GiB from a 1 MiB file."""
    real, tokenizer = base
    pt = tmp_path / "model_optim_rng.pt"
    encode_again = b"h\x01h\x00h\x02\x86R"  # BINGET encode, BINGET text, BINGET 'latin1', TUPLE2, REDUCE
    body = (P2 + global_("_codecs", "encode") + b"q\x01" + text("a" * 2**20) + b"q\x00" + text("latin1") + b"q\x02"
            + b"](" + encode_again * 1000 + b"e.")
    legacy_checkpoint(pt, body)
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason="byte-amplification")


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_a_view_larger_than_its_storage_is_refused(layout, base, tmp_path, capsys, monkeypatch):
    """A stride-0 view: a few bytes on disk claiming an 80 GB tensor once converted."""
    real, tokenizer = base
    ckpt = torch.load(real, weights_only=False)
    ckpt["model"]["language_model"]["embedding"]["word_embeddings"]["weight"] = torch.zeros(1).expand(200000, 100000)
    pt = tmp_path / "model_optim_rng.pt"
    torch.save(ckpt, pt, _use_new_zipfile_serialization=layout == "zip")
    assert_refused(tmp_path, pt, tokenizer, capsys, monkeypatch, reason="claims more elements than its 4-byte storage")
    torch.save({"model.embed_tokens.weight": torch.zeros(1).expand(200000, 100000)}, tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=layout == "zip")
    with pytest.raises(CheckpointError, match="claims more elements"):
        list(iter_tensors(str(tmp_path / "pytorch_model.bin")))


def test_an_enum_member_pickled_by_name_loads_as_a_placeholder(tmp_path):
    """Python >= 3.11.2 pickles an enum member as getattr(EnumClass, "NAME") (Megatron's args hold
    enums): that call is allowed on the file's own classes only, and never runs getattr."""
    member = call(global_("builtins", "getattr"), global_("megatron.model.enums", "AttnMaskType"), text("causal"))
    legacy_checkpoint(tmp_path / "ok.pt", P2 + member + b".")
    loaded = load(str(tmp_path / "ok.pt"), foreign_classes=True)
    assert isinstance(loaded, Placeholder) and loaded.args == ("causal",)
    with pytest.raises(PersimmonError, match="refused to load: it calls builtins.getattr"):
        load(str(tmp_path / "ok.pt"), foreign_classes=False)  # a weights file: no classes, no members


@pytest.mark.parametrize("owner, args", [
    (global_("torch._utils", "_rebuild_tensor"), text("__globals__")),  # a real function's internals
    (global_("megatron.model.enums", "AttnMaskType"), text("__class__")),  # a private name
    (global_("megatron.model.enums", "AttnMaskType"), b"K\x05"),  # not a name
    (global_("megatron.model.enums", "AttnMaskType"), text("causal") + text("default")),  # getattr's default
    (global_("collections", "OrderedDict"), text("fromkeys")),  # a real class
])
def test_getattr_on_anything_else_is_refused(tmp_path, owner, args):
    legacy_checkpoint(tmp_path / "bad.pt", P2 + call(global_("builtins", "getattr"), owner, args) + b".")
    with pytest.raises(PersimmonError, match="refused to load"):
        load(str(tmp_path / "bad.pt"), foreign_classes=True)
