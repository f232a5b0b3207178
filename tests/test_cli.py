"""The console script, run as a user runs it."""

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import threading

import pytest
import torch
from conftest import error_line, read_terminal

from persimmon_export.load.checkpoint import load_model
from persimmon_runtime import IncrementalDetokenizer, Tokenizer, format_chat

EXE = shutil.which("persimmon-export") or os.path.join(os.path.dirname(sys.executable), "persimmon-export")


def run(*args, cwd=None):
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def run_on_a_terminal(*args, cwd=None):
    """(result with stdout, what reached stderr): stderr is a pseudo-terminal, as when a user watches."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns, like a window
    process = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=terminal, text=True, cwd=cwd)
    os.close(terminal)
    shown = []
    reader = threading.Thread(target=lambda: shown.extend(iter(lambda: read_terminal(controller), b"")))
    reader.start()  # drained while it runs: a full terminal buffer would block the writer
    stdout, _ = process.communicate(timeout=300)
    reader.join(timeout=30)
    os.close(controller)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout), b"".join(shown).decode()


def test_help_lists_the_subcommands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("convert", "build", "parity", "doctor", "demo"):
        assert command in result.stdout
    assert "adept_vocab.model" in run("convert", "--help").stdout


def transformers_greedy_answer(checkpoint: str, prompt: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """The reference: transformers' greedy chat answer from the checkpoint, stopping at its config's
    EOS, as (the answer's text, the ids generated, EOS included)."""
    import transformers

    model = transformers.PersimmonForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_dir(checkpoint)
    prompt_ids = tokenizer.encode(format_chat(prompt))
    eos = model.config.eos_token_id
    output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=eos, pad_token_id=eos)
    new_ids = output[0, len(prompt_ids):].tolist()
    stream = IncrementalDetokenizer(tokenizer, prompt_ids)
    answer = "".join(stream.push(i) for i in new_ids if i != eos) + stream.finish()
    return answer, new_ids


def test_demo_makes_a_checkpoint_and_streams_generation(tmp_path):
    result = run("demo", "--out", "ckpt", "--max-new-tokens", "12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "human: What is the capital of France?\\n\\nadept:" in result.stderr  # the log, on stderr
    model = load_model(str(tmp_path / "ckpt"))
    tokenizer = Tokenizer.from_dir(str(tmp_path / "ckpt"))
    assert model.config.vocab_size >= tokenizer.vocab_size
    assert model.config.bos_token_id == tokenizer.bos_id
    # what it streamed is the written checkpoint's greedy answer, and the count is what transformers generates
    answer, new_ids = transformers_greedy_answer(str(tmp_path / "ckpt"), "What is the capital of France?", 12)
    expected = f"{answer}\n".replace("\r\n", "\n").replace("\r", "\n")  # (newlines as text mode reads them)
    assert answer.strip() and result.stdout == expected  # stdout: the answer alone
    assert result.stderr.rstrip().splitlines()[-1].startswith(f"{len(new_ids)} tokens in ")


def test_the_demo_stops_at_eos_and_counts_what_it_generated(tmp_path, capsys):
    """The demo's count is the model's, not the argument's: with the checkpoint's EOS set to the
    first token its greedy answer makes from the fifth on, it stops there, as transformers does."""
    from persimmon_export.demo import make_demo_checkpoint, stream_greedy_answer

    prompt = "What is the capital of France?"
    free_run, ids = transformers_greedy_answer(make_demo_checkpoint(str(tmp_path / "a")), prompt, 12)
    assert len(ids) == 12  # this checkpoint's EOS does not come
    fifth = next(i for k, i in enumerate(ids) if k >= 4 and i not in ids[:k])  # the first new token from step 5 on
    checkpoint = make_demo_checkpoint(str(tmp_path / "b"), eos_token_id=fifth)  # same seed: the same weights
    answer, new_ids = transformers_greedy_answer(checkpoint, prompt, 12)
    assert new_ids[-1] == fifth and len(new_ids) == ids.index(fifth) + 1 < 12
    assert stream_greedy_answer(checkpoint, prompt, 12) == (answer, len(new_ids))
    assert capsys.readouterr().out == answer + "\n" and answer != free_run


def test_quiet_prints_only_the_result(tmp_path):
    result, terminal = run_on_a_terminal("demo", "--out", "ckpt", "--max-new-tokens", "3", "--quiet", cwd=tmp_path)
    assert result.returncode == 0 and terminal == ""
    assert len(result.stdout.splitlines()) == 1 and "tokens in" not in result.stdout  # the answer alone


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    result = run("convert", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_build_then_parity_from_the_shell(tmp_path):
    assert run("demo", "--out", "ckpt", "--max-new-tokens", "2", cwd=tmp_path).returncode == 0
    built, terminal = run_on_a_terminal("build", "--checkpoint", "ckpt", "--out", "build", "--dtype", "float32",
                                        "--max-seq", "128", "--verbose", cwd=tmp_path)
    assert built.returncode == 0, terminal
    assert built.stdout.startswith("built build: causal-lm float32, kv_capacity 128")  # stdout: the result alone
    assert len(built.stdout.splitlines()) == 1 and "checking model.onnx" in terminal  # logs: stderr
    assert re.search(r"model\.embed_tokens\.weight: \(\d+, 64\) torch\.float32\r?$", terminal, re.M)  # --verbose
    assert "weights:" in terminal and "%|" in terminal  # the bar, on the terminal
    assert not re.search(r"^ +\d+/\d+ tensors", terminal, re.M)  # it replaces the count lines
    parity = run("parity", "--checkpoint", "ckpt", "--build", "build", "--steps", "8", cwd=tmp_path)
    assert parity.returncode == 0, parity.stdout + parity.stderr
    assert "PASS" in parity.stdout and parity.stdout.strip().endswith("parity: all bounds hold")
    strict = run("parity", "--checkpoint", "ckpt", "--build", "build", "--steps", "2", "--max-abs-diff", "1e-12",
                 cwd=tmp_path)
    assert strict.returncode == 1 and "FAIL" in strict.stdout


def test_build_errors_are_one_line(tmp_path):
    result = run("build", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and error_line(result.stderr)
    assert "not a directory" in result.stderr and not (tmp_path / "b").exists()


def test_kv_capacity_has_one_name_and_the_old_flag_still_sets_it(capsys):
    from persimmon_export.cli import build_parser

    parser = build_parser()
    base = ["build", "--checkpoint", "ckpt", "--out", "build"]
    assert parser.parse_args(base + ["--kv-capacity", "64"]).kv_capacity == 64
    assert parser.parse_args(base + ["--max-seq", "96"]).kv_capacity == 96  # what existing scripts pass
    with pytest.raises(SystemExit):
        parser.parse_args(["build", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--kv-capacity SLOTS, --max-seq SLOTS" in help_text
    assert "the manifest's kv_capacity" in help_text and "is an older name of this flag" in help_text


# ---- tools that compose: results on stdout, logs on stderr, --json, -q ----

RUN_EXE = os.path.join(os.path.dirname(EXE), "persimmon-run")


def test_doctor_json_feeds_a_pipeline():
    """The issue's proof, as a shell runs it: stdout is one JSON document and nothing else."""
    pipeline = subprocess.run(["bash", "-c", f"set -o pipefail; '{EXE}' doctor --json | '{sys.executable}' -c "
                               "'import json,sys; print(sorted(json.load(sys.stdin))[:2])'"],
                              capture_output=True, text=True, timeout=300)
    assert pipeline.returncode == 0, pipeline.stderr
    assert pipeline.stdout == "['cuda-python', 'gpu']\n"


def test_build_json_quiet_and_parity_json(tiny_checkpoint, tmp_path):
    import json

    from persimmon_runtime.manifest import Manifest

    out = tmp_path / "b"
    built = run("build", "--checkpoint", tiny_checkpoint, "--out", str(out), "--dtype", "float32", "--kv-capacity",
                "64", "--backend", "onnxruntime", "--json", "-q")
    assert built.returncode == 0 and built.stderr == "", built.stderr  # -q: no progress, no warning here
    summary, manifest = json.loads(built.stdout), Manifest.load(str(out))
    assert summary["build"] == str(out) and summary["kv_capacity"] == manifest.kv_capacity == 64
    assert summary["onnx_ir_version"] == manifest.onnx.ir_version and summary["engine"] is None
    assert summary["bytes"] == sum(os.path.getsize(out / name) for name in manifest.files)
    quiet = run("build", "--checkpoint", tiny_checkpoint, "--out", str(out), "--dtype", "float32", "--kv-capacity",
                "64", "--backend", "onnxruntime", "--overwrite", "-q")
    assert quiet.stderr == "" and quiet.stdout.splitlines() == [
        f"built {out}: causal-lm float32, kv_capacity 64, max_batch 8, onnxruntime, {summary['bytes'] / 1e6:.1f} MB"]
    for bound, status in ((None, 0), ("1e-12", 1)):  # the exit status is the verdict's, with --json too
        args = ["--max-abs-diff", bound] if bound else []
        parity = run("parity", "--checkpoint", tiny_checkpoint, "--build", str(out), "--steps", "2", "--json", *args)
        report = json.loads(parity.stdout)
        assert parity.returncode == status and report["passed"] is (status == 0)
        assert report["results"][0]["backend"] == "onnxruntime" and report["results"][0]["passed"] is (status == 0)


def test_a_float16_build_refuses_out_before_its_calibration(tiny_checkpoint, tmp_path):
    """The fp32 reference (about 35 GiB at 8B) is not loaded for a build that cannot be written."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    refused = run("build", "--checkpoint", tiny_checkpoint, "--out", str(taken), "--dtype", "float16")
    assert refused.returncode == 2 and "did not write" in error_line(refused.stderr)
    assert "range report" not in refused.stderr and "loading" not in refused.stderr
    assert os.listdir(taken) == ["notes.txt"]


def test_persimmon_run_reports_on_stderr_and_shows_the_first_verification(tiny_build, tmp_path):
    build = tmp_path / "copy"
    shutil.copytree(tiny_build, build)  # never verified: the first load hashes it
    first = subprocess.run([RUN_EXE, str(build), "Hello", "--max-new-tokens", "3", "--ignore-eos"],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert lines[0].startswith(f"verifying the sha256 of {build} (") and lines[1].startswith(f"verified {build} in ")
    assert re.fullmatch(r"finish_reason length: \d+ prompt tokens, 3 generated in [0-9.]+ s \([0-9.]+ tokens/s\)",
                        lines[-1])
    again = subprocess.run([RUN_EXE, str(build), "Hello", "--max-new-tokens", "3", "--ignore-eos", "--no-stream"],
                           capture_output=True, text=True, timeout=300)
    assert again.stdout == first.stdout and again.stderr.splitlines()[-1].startswith("finish_reason length: ")
    quiet = subprocess.run([RUN_EXE, str(build), "Hello", "--max-new-tokens", "3", "--ignore-eos", "-q"],
                           capture_output=True, text=True, timeout=300)
    assert quiet.stdout == first.stdout and quiet.stderr == ""


def test_parity_refuses_a_checkpoint_the_build_was_not_made_from_before_running_anything(tiny_build, tmp_path):
    from conftest import transformers_checkpoint

    other = str(tmp_path / "other")
    transformers_checkpoint(other, Tokenizer.from_dir(tiny_build), num_hidden_layers=1)
    refused = run("parity", "--checkpoint", other, "--build", tiny_build)
    line = error_line(refused.stderr)
    assert refused.returncode == 2 and "the build was not made from this checkpoint" in line
    assert "num_hidden_layers=1" in line and "loading" not in refused.stderr and refused.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--backend", "onnxruntime", "bogus"], "--backend 'bogus' is unknown"),
    (["--backend", "onnxruntime", "tensorrt"], "--backend tensorrt: {build} has no TensorRT engine"),
    (["--min-top1", "7"], "--min-top1 must be in 0..1"),
    (["--max-abs-diff", "nan"], "--max-abs-diff must be a finite number >= 0, got nan"),
])
def test_parity_refuses_bad_arguments_before_any_model_runs(tiny_checkpoint, tiny_build, args, message):
    refused = run("parity", "--checkpoint", tiny_checkpoint, "--build", tiny_build, *args)
    assert refused.returncode == 2 and message.format(build=tiny_build) in error_line(refused.stderr)
    assert "loading" not in refused.stderr and refused.stdout == ""  # no reference load, no backend step


def test_persimmon_run_refuses_bad_sampling_before_verifying_the_build(tiny_build, tmp_path):
    build = tmp_path / "copy"
    shutil.copytree(tiny_build, build)  # unverified: a load would hash it first
    for args in (["--temperature", "-1"], ["--top-p", "5"]):
        refused = subprocess.run([RUN_EXE, str(build), "Hello", *args], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and error_line(refused.stderr) and "verifying" not in refused.stderr


def test_build_refuses_a_bad_workspace_before_its_calibration(tiny_checkpoint, tmp_path):
    refused = run("build", "--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "b"), "--backend", "tensorrt-rtx",
                  "--workspace-gb", "-1")
    assert refused.returncode == 2 and "--workspace-gb must be a positive number of GiB" in error_line(refused.stderr)
    assert "range report" not in refused.stderr and not (tmp_path / "b").exists()


def test_json_output_has_no_nan(capsys):
    """An fp16 overflow puts NaN into parity's differences; JSON has no NaN: it is written as null."""
    import json

    from persimmon_runtime.console import print_json

    print_json({"max_abs_diff": float("nan"), "rows": [float("inf"), 1.5]})
    assert json.loads(capsys.readouterr().out) == {"max_abs_diff": None, "rows": [None, 1.5]}
