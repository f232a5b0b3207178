"""PERSIMMON_REQUIRE_GPU=1 (examples/gpu_tests.sh) turns the skip of a `gpu` test into a failure."""

import os
import subprocess
import sys

TESTS = '''
import pytest

@pytest.mark.gpu
def test_needs_a_device():
    pytest.skip("no CUDA device")

def test_elsewhere():
    pytest.skip("not a GPU reason")

@pytest.mark.gpu
def test_runs():
    pass
'''


def _run(tmp_path, require: str | None):
    (tmp_path / "test_sample.py").write_text(TESTS)
    env = {key: value for key, value in os.environ.items() if key != "PERSIMMON_REQUIRE_GPU"}
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))  # the hook alone, not conftest's imports
    if require is not None:
        env["PERSIMMON_REQUIRE_GPU"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_switch", "-rfs",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)


def test_a_skipped_gpu_test_fails_when_a_gpu_is_required(tmp_path):
    result = _run(tmp_path, "1")
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed, 1 skipped" in result.stdout
    assert "PERSIMMON_REQUIRE_GPU=1 and this GPU test was skipped: Skipped: no CUDA device" in result.stdout


def test_skips_stay_skips_otherwise(tmp_path):
    for require in (None, "0"):
        result = _run(tmp_path, require)
        assert result.returncode == 0 and "1 passed, 2 skipped" in result.stdout, result.stdout


def test_the_gpu_check_dry_run_names_every_part_and_what_each_lacks(tmp_path):
    """examples/gpu_check.py --dry-run, as run here (no GPU): every part listed with its command, and
    each that cannot run says why; the exit status says the run would not pass."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    report = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, os.path.join(root, "examples", "gpu_check.py"), "--dry-run",
                           "--skip", "tensorrt", "--json", str(report)], capture_output=True, text=True, timeout=300)
    parts = {row["part"]: row for row in json.loads(report.read_text())["parts"]}
    assert list(parts) == ["kernels", "emulation", "cuda-layer", "decode-step", "onnxruntime-cuda", "tensorrt"]
    assert parts["tensorrt"]["status"] == "skipped"
    for name in ("kernels", "emulation", "cuda-layer", "decode-step", "onnxruntime-cuda"):
        row = parts[name]
        assert row["command"] and row["status"] in ("would run", "would fail")
        assert (row["status"] == "would fail") == bool(row["why"])
    if any(row["status"] == "would fail" for row in parts.values()):
        assert done.returncode == 1 and "would fail" in done.stdout
