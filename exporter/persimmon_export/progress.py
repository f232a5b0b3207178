"""Progress of the long steps (the weight stream, conversion, the engine build).

On a terminal a tqdm bar (on stderr) shows it; elsewhere (a log file, CI, a pipe) an INFO line
every few steps does. Both follow the logger's level: nothing shows when INFO is off (the
CLI's --quiet, or a library caller that did not configure logging).
"""

from __future__ import annotations

import contextlib
import logging
import sys


def bars_shown(log: logging.Logger) -> bool:
    """Whether a bar goes to the screen: stderr is a terminal and `log` shows INFO."""
    return log.isEnabledFor(logging.INFO) and sys.stderr.isatty()


class Steps:
    """`step(note="")` once per finished step of `total`; `close()` (or a with block) at the end.

    A bar when `bars_shown(log)`, else the INFO line "  i/total unit[, note]" every `every` steps
    and at the last. Log records written while the bar shows go above it, not through it.
    """

    def __init__(self, log: logging.Logger, what: str, total: int, unit: str, every: int):
        self.log, self.total, self.unit, self.every, self.done = log, total, unit, every, 0
        self.exits = contextlib.ExitStack()
        self.bar = None
        if bars_shown(log):
            from tqdm import tqdm  # here: a torch-free serving host (doctor, triton) has no tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            package = logging.getLogger(log.name.partition(".")[0])  # where the CLI puts its handler
            self.exits.enter_context(logging_redirect_tqdm(loggers=[package]))
            self.bar = self.exits.enter_context(tqdm(total=total, desc=what, unit=unit, file=sys.stderr,
                                                     leave=False, dynamic_ncols=True))

    def __call__(self, note: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update()
        elif self.done % self.every == 0 or self.done == self.total:
            self.log.info(f"  {self.done}/{self.total} {self.unit}" + (f", {note}" if note else ""))

    def close(self) -> None:
        self.exits.close()

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_monitor(trt, log: logging.Logger):
    """A progress monitor for `trt`'s builder (TensorRT or TensorRT-RTX): a bar per build phase,
    nested as the builder nests them; None where no bar is shown (the phases are too many and
    too short for log lines)."""
    if not bars_shown(log):
        return None
    from tqdm import tqdm

    class PhaseBars(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=len(self.bars), leave=False,
                                         file=sys.stderr, dynamic_ncols=True)

        def step_complete(self, phase_name, step) -> bool:
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return PhaseBars()
