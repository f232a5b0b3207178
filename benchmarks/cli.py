"""The command line every benchmark script shares: where its results go (--json) and --smoke.

--smoke runs the script's own code path at its smallest (the smallest config, a few tokens, one
repeat, peers with their own venv only where present): it checks that the script still runs and
writes the fields docs/benchmarks.md reads. Its figures mean nothing, so they go to
benchmarks/results/smoke/ (not kept in git) unless --json says otherwise. Options given on the
command line win over the smoke settings. tests/test_benchmarks.py runs every script's --smoke.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SMOKE_RESULTS = os.path.join(RESULTS, "smoke")


def _as_flags(settings: dict) -> str:
    flags = []
    for dest, value in settings.items():
        flag = "--" + dest.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags.append(" ".join([flag, *map(str, value)]))
        else:
            flags.append(f"{flag} {value}")
    return " ".join(flags)


class BenchmarkParser(argparse.ArgumentParser):
    """An ArgumentParser with --json (default benchmarks/results/RESULTS_NAME, or none when
    results_name is None: the script names its file itself) and --smoke (`smoke`: option dest ->
    value, applied as defaults). `under_out`: a device machine script, whose default is
    $OUT/RESULTS_NAME where $OUT is set (the folder the device tool brings back)."""

    def __init__(self, doc: str, results_name: str | None, smoke: dict, under_out: bool = False):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.results_name, self.smoke = results_name, smoke
        folder = (under_out and os.environ.get("OUT")) or RESULTS
        where = f"benchmarks/results/{results_name}" + (", or $OUT/ where set" if under_out else "") \
            if results_name else "see above"
        self.add_argument("--json", default=os.path.join(folder, results_name) if results_name else None,
                          help=f"where to write the results (default {where})")
        self.add_argument("--smoke", action="store_true",
                          help=f"check that this script runs, at its smallest ({_as_flags(smoke)}); results go "
                               "to benchmarks/results/smoke/ unless --json is given")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.smoke:
            defaults = dict(self.smoke)
            if self.results_name:
                defaults["json"] = os.path.join(SMOKE_RESULTS, self.results_name)
            self.set_defaults(**defaults)
            parsed = super().parse_args(args, namespace)
        return parsed


def results_dir(smoke: bool) -> str:
    return SMOKE_RESULTS if smoke else RESULTS


def write_json(path: str, report: dict) -> None:
    """Write `report` to `path` whole or not at all (a temporary file renamed over it)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # as open() would make it (mkstemp's file is the owner's alone)
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(report, f, indent=2, default=float)
            f.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    print(f"wrote {path}", flush=True)
