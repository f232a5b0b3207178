"""Progress of long steps: log lines off a terminal, a bar on one, nothing when quiet."""

import logging

import pytest

from persimmon_export.progress import Steps
from persimmon_runtime.console import configure_logging

LOG = logging.getLogger("persimmon_export.test_progress")


def _count(steps: Steps, n: int) -> None:
    with steps as step:
        for i in range(n):
            step(f"{i} GiB")


def test_off_a_terminal_a_line_every_n_steps_and_at_the_last(caplog):
    caplog.set_level(logging.INFO, "persimmon_export")
    _count(Steps(LOG, "weights", 5, "tensors", every=2), 5)
    assert [r.getMessage() for r in caplog.records] == ["  2/5 tensors, 1 GiB", "  4/5 tensors, 3 GiB",
                                                       "  5/5 tensors, 4 GiB"]


def test_on_a_terminal_a_bar_instead_of_lines(caplog, terminal):
    caplog.set_level(logging.INFO, "persimmon_export")
    shown = terminal()
    _count(Steps(LOG, "weights", 5, "tensors", every=2), 5)
    shown = shown()
    assert "weights:" in shown and "/5 [" in shown  # (redrawn at most every 0.1 s: this run is quicker)
    assert caplog.records == []


def test_quiet_shows_no_bar_and_no_lines(caplog, terminal):
    caplog.set_level(logging.WARNING, "persimmon_export")
    shown = terminal()
    _count(Steps(LOG, "weights", 5, "tensors", every=2), 5)
    assert shown() == "" and caplog.records == []


@pytest.mark.parametrize("verbosity,shown", [("quiet", ["warning"]), ("normal", ["info", "warning"]),
                                             ("verbose", ["debug", "info", "warning"])])
def test_the_cli_levels_print_plain_lines_on_stderr(capsys, verbosity, shown):
    configure_logging(verbosity)
    try:
        for level in ("debug", "info", "warning"):
            getattr(LOG, level)(level)
    finally:
        configure_logging("normal")
    out, err = capsys.readouterr()
    assert err.splitlines() == shown and out == ""  # stdout stays for results
