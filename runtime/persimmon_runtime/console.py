"""What both console scripts do around a command: one line per error, clean exits on signals."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable

from .errors import PersimmonError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup (temp directories) runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


LOGGERS = ("persimmon_export", "persimmon_runtime", "persimmon_plugins")  # the libraries' module loggers
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}


class _StderrHandler(logging.StreamHandler):
    """Plain message lines on whatever sys.stderr is when a record comes (a CLI may run in-process,
    with stderr replaced). Logs and progress go to stderr, so stdout carries only results
    (generated text, reports, --json documents) and a pipeline reads nothing else."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ sets it; the property always answers sys.stderr
        pass

    def handleError(self, record) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            raise  # the reader went away: stop, like print would (run_command says so in one line)
        super().handleError(record)


_HANDLER = _StderrHandler()


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """--quiet / --verbose, read back by `configure_logging(args.verbosity)`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const="quiet", default="normal",
                       help="print only warnings (stderr) and the result (stdout): no progress lines or bars")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const="verbose",
                       help="also print debugging detail (e.g. every tensor as it is written)")


def configure_logging(verbosity: str = "normal") -> None:
    """Show our libraries' log records as plain lines on stderr at the chosen level; other
    libraries' records stay at their defaults. Idempotent: the CLI may run more than once."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(LEVELS[verbosity])
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """Run `command`; return the exit status. Bad input -> one `prog: error: ...` line and 2."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # where handlers may be set
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return command() or 0
    except PersimmonError as e:
        return _error(prog, e)
    except BrokenPipeError:
        # The reader went away (`| head`): stop. Point stdout at /dev/null so the interpreter's
        # final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _error(prog, "standard output was closed (broken pipe); stopped")
    except OSError as e:
        # The library names the file in its own errors where it can; this is the net for the
        # rest (a disk failing mid-read, ...): still one line, with the path the OS reported.
        return _error(prog, e)
    except Terminated:
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def print_json(document) -> None:
    """One JSON document on stdout (a --json result), for `json.load(sys.stdin)` at the other end.
    NaN and infinities (an fp16 overflow in a parity result) are not JSON: they are written as null."""
    json.dump(_finite(document), sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _error(prog: str, message) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def utf8_argument(what: str, value: str) -> str:
    """argv bytes that are not UTF-8 arrive as lone surrogates (PEP 383): refuse them by name."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise PersimmonError(f"{what}: not valid UTF-8 ({bad} at character {e.start}); pass UTF-8 text") from None
    return value
