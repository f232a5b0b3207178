"""The PERSIMMON_REQUIRE_GPU=1 switch, a pytest hook (conftest.py imports it; -p gpu_switch loads it alone).

On a GPU machine (examples/gpu_tests.sh) a test marked `gpu` that skips - no device, no driver,
no TensorRT, no CuPy - hides exactly what the run is for: there, its skip is a failure.
"""

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    required = os.environ.get("PERSIMMON_REQUIRE_GPU") == "1"
    if required and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"PERSIMMON_REQUIRE_GPU=1 and this GPU test was skipped: {reason}"
