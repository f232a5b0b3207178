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
