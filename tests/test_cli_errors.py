"""Careless and hostile command lines: each gets one clear error line, never a traceback or a hang."""

import os
import shutil
import stat
import subprocess
import sys
import time

import pytest
from conftest import error_line, without_permission_override

from persimmon_export import doctor
from persimmon_export.validate.parity import check_parity
from persimmon_runtime import PersimmonError
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import Manifest

BIN = os.path.dirname(sys.executable)


def run(tool, *args, **kwargs):
    return subprocess.run([os.path.join(BIN, tool), *args], capture_output=True, timeout=300, **kwargs)


def assert_one_line(result, *fragments):
    err = result.stderr.decode("utf-8", "replace") if isinstance(result.stderr, bytes) else result.stderr
    assert result.returncode == 2, (result.returncode, err)
    error_line(err)
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("steps", [-1, -1000])
def test_parity_refuses_negative_steps(tiny_checkpoint, tiny_build, steps):
    with pytest.raises(PersimmonError, match="--steps must be"):
        check_parity(tiny_checkpoint, tiny_build, decode_steps=steps)


def test_parity_steps_past_the_cache_name_the_capacity(tiny_checkpoint, tiny_build):
    capacity = Manifest.load(tiny_build).kv_capacity
    assert capacity < 100  # so a few-token prompt + 100 steps cannot fit; the error says how many can
    with pytest.raises(PersimmonError, match=f"kv_capacity {capacity}; use --steps <= "):
        check_parity(tiny_checkpoint, tiny_build, prompts=["hello"], decode_steps=100)
    result = run("persimmon-export", "parity", "--checkpoint", tiny_checkpoint, "--build", tiny_build,
                 "--prompt", "hello", "--steps", "1000")
    assert_one_line(result, f"kv_capacity {capacity}")


def test_parity_exactly_filling_the_cache_runs(tiny_checkpoint, tiny_build):
    generator = Generator.load(tiny_build)
    prompt_len = len(generator.tokenizer.encode("hello"))
    steps = generator.manifest.kv_capacity - prompt_len
    [result] = check_parity(tiny_checkpoint, tiny_build, prompts=["hello"], decode_steps=steps)
    assert result.passed and result.decode_steps == steps


def test_parity_refuses_more_prompts_than_the_batch(tiny_checkpoint, tiny_build):
    max_batch = Manifest.load(tiny_build).max_batch
    with pytest.raises(PersimmonError, match=f"max_batch is {max_batch}"):
        check_parity(tiny_checkpoint, tiny_build, prompts=["a"] * (max_batch + 1), decode_steps=1)


@pytest.mark.parametrize("device", ["cuda:x", "cuda:", "gpu", "cpu:0:1", "", "cuda:-1", "cuda:99999", "CPU"])
def test_bad_device_strings_are_one_line(tiny_build, device):
    with pytest.raises(PersimmonError, match="is not 'cpu', 'cuda' or 'cuda:N'"):
        Generator.load(tiny_build, device=device)


def test_bad_device_from_both_clis(tiny_checkpoint, tiny_build):
    assert_one_line(run("persimmon-run", tiny_build, "hi", "--device", "cuda:x"), "cuda:x")
    assert_one_line(run("persimmon-export", "parity", "--checkpoint", tiny_checkpoint, "--build", tiny_build,
                        "--device", "cuda:x", "--steps", "1"), "cuda:x")


def test_closed_stdout_stops_generation_with_one_line(tiny_build):
    # `persimmon-run ... | head -c 5`: the reader leaves after 5 bytes
    shell = f"{os.path.join(BIN, 'persimmon-run')} {tiny_build} 'hello' --max-new-tokens 40 --ignore-eos | head -c 5"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, timeout=300)
    assert len(result.stdout) <= 5
    assert_one_line(result, "broken pipe")


@pytest.mark.parametrize("raw", [b"\xff", b"caf\xe9", b"ok \xed\xa0\x80 surrogate", b"\xc3"])
def test_prompt_that_is_not_utf8_is_one_line(tiny_build, raw):
    result = subprocess.run([os.fsencode(os.path.join(BIN, "persimmon-run")), os.fsencode(tiny_build), raw],
                            capture_output=True, timeout=300)
    assert_one_line(result, "prompt: not valid UTF-8")


def test_non_utf8_build_path_is_reported_not_crashed(tmp_path):
    missing = os.fsencode(str(tmp_path)) + b"/\xff\xfe-build"
    result = subprocess.run([os.fsencode(os.path.join(BIN, "persimmon-run")), missing, b"hi"],
                            capture_output=True, timeout=300)
    assert_one_line(result, "not found")


def _hanging_tool(directory, name):
    path = directory / name
    path.write_text("#!/bin/sh\nexec sleep 600\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_doctor_does_not_hang_on_a_wedged_nvidia_smi_or_nvcc(tmp_path, monkeypatch):
    for tool in ("nvidia-smi", "nvcc"):
        _hanging_tool(tmp_path, tool)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(doctor, "PROBE_TIMEOUT_S", 1.0)
    started = time.monotonic()
    findings = dict(doctor.report())
    assert time.monotonic() - started < 30
    assert "did not answer within 1s" in findings["gpu"]
    assert "did not finish compiling" in findings["plugins"]


@pytest.mark.parametrize("lock", ["directory", "config.json", "model.safetensors", "tokenizer.model"])
def test_unreadable_checkpoint_is_one_line_naming_it(tiny_checkpoint, tmp_path, lock):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    target = ck if lock == "directory" else ck / lock
    target.chmod(0)
    result = subprocess.run([*without_permission_override(), os.path.join(BIN, "persimmon-export"), "build",
                             "--checkpoint", str(ck), "--out", str(tmp_path / "out"), "--dtype", "float32",
                             "--kv-capacity", "32"], capture_output=True, timeout=300)
    assert_one_line(result, target.name)
    err = result.stderr.decode()
    assert "ermission denied" in err and "not found" not in err
    assert not (tmp_path / "out").exists()


def test_a_non_utf8_checkpoint_path_is_named_as_such(tiny_checkpoint, tmp_path):
    ck = os.path.join(os.fsencode(str(tmp_path)), b"ck\xff")
    shutil.copytree(os.fsencode(tiny_checkpoint), ck)
    result = run("persimmon-export", "build", "--checkpoint", ck, "--out", str(tmp_path / "out"), "--dtype", "float32",
                 "--kv-capacity", "32")
    assert_one_line(result, "opens only UTF-8 paths")
    assert "truncated" not in result.stderr.decode()


def test_doctor_names_the_driver_the_plugin_ptx_needs():
    from persimmon_plugins.compile import PTX_ISA_MIN_CUDA, nvcc, plugin_ptx_requirements

    if nvcc() is None:
        pytest.skip("no nvcc: the plugins line says so instead")
    needs = plugin_ptx_requirements()
    finding = dict(doctor.report())["plugins"]
    assert f"ISA {needs['isa']}" in finding and f"CUDA {PTX_ISA_MIN_CUDA[needs['isa']]}+ driver" in finding
