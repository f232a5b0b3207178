"""The console script, run as a user runs it."""

import os
import shutil
import subprocess
import sys

import pytest

from persimmon_export.checkpoint import load_model
from persimmon_runtime import Tokenizer


def run(*args, cwd=None):
    exe = shutil.which("persimmon-export") or os.path.join(os.path.dirname(sys.executable), "persimmon-export")
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_the_subcommands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("convert", "build", "parity", "doctor", "demo"):
        assert command in result.stdout
    assert "adept_vocab.model" in run("convert", "--help").stdout


def test_demo_makes_a_checkpoint_and_streams_generation(tmp_path):
    result = run("demo", "--out", "ckpt", "--max-new-tokens", "12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "human: What is the capital of France?\\n\\nadept:" in result.stdout
    assert "12 tokens in" in result.stdout
    model = load_model(str(tmp_path / "ckpt"))
    tokenizer = Tokenizer.from_dir(str(tmp_path / "ckpt"))
    assert model.config.vocab_size >= tokenizer.vocab_size
    assert model.config.bos_token_id == tokenizer.bos_id


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    result = run("convert", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_build_then_parity_from_the_shell(tmp_path):
    assert run("demo", "--out", "ckpt", "--max-new-tokens", "2", cwd=tmp_path).returncode == 0
    built = run("build", "--checkpoint", "ckpt", "--out", "build", "--dtype", "float32", "--max-seq", "128",
                cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert "checking the graph" in built.stdout and "built" in built.stdout
    parity = run("parity", "--checkpoint", "ckpt", "--build", "build", "--steps", "8", cwd=tmp_path)
    assert parity.returncode == 0, parity.stdout + parity.stderr
    assert "PASS" in parity.stdout and parity.stdout.strip().endswith("parity: all bounds hold")
    strict = run("parity", "--checkpoint", "ckpt", "--build", "build", "--steps", "2", "--max-abs-diff", "1e-12",
                 cwd=tmp_path)
    assert strict.returncode == 1 and "FAIL" in strict.stdout


def test_build_errors_are_one_line(tmp_path):
    result = run("build", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not a directory" in result.stderr and not (tmp_path / "b").exists()
