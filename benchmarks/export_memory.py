"""Peak memory and wall time of `persimmon-export build` on a Persimmon-8B-shaped checkpoint.

    .venv/bin/python benchmarks/export_memory.py [--work /tmp/persimmon-export-bench] [--layers 36]

Writes an 8B-shaped bf16 checkpoint with random weights (about 18.8 GB; --layers scales it
down) plus a tiny tokenizer, runs `persimmon-export build --dtype float16` on it in a child
process, and reports the child's wall time, peak RSS and peak anonymous memory (sampled
RssAnon, what the process really holds; RSS also counts memory-mapped checkpoint pages).
Target: peak RSS < 8 GiB. Deletes everything it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

from checkpoint_memory import write_checkpoint


def sample_memory(pid: int, result: dict) -> None:
    """Track VmHWM (peak RSS of the process since exec) and RssAnon of `pid` until it exits.

    ru_maxrss is no use here: Linux carries the parent's high-water mark into a fork+exec child.
    """
    fields = {"VmHWM:": "peak_rss_bytes", "RssAnon:": "peak_anon_bytes"}
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key = fields.get(line.split(":")[0] + ":")
                    if key:
                        result[key] = max(result.get(key, 0), int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/persimmon-export-bench")
    parser.add_argument("--layers", type=int, default=36)
    args = parser.parse_args()
    checkpoint, out = os.path.join(args.work, "checkpoint"), os.path.join(args.work, "build")
    try:
        from persimmon_export.convert import tokenizer_files
        from persimmon_export.demo import train_tokenizer
        from persimmon_runtime import Tokenizer

        os.makedirs(args.work, exist_ok=True)
        tokenizer = Tokenizer(train_tokenizer(os.path.join(args.work, "sp.model")))
        print(f"writing {args.layers}-layer 8B-shaped checkpoint to {checkpoint} ...", flush=True)
        seconds = write_checkpoint(checkpoint, args.layers, extra_files=tokenizer_files(tokenizer))
        print(f"  written in {seconds:.0f}s", flush=True)
        exe = os.path.join(os.path.dirname(sys.executable), "persimmon-export")
        command = [exe, "build", "--checkpoint", checkpoint, "--out", out, "--dtype", "float16",
                   "--max-seq", "4096", "--max-batch", "8"]
        print("running:", " ".join(command), flush=True)
        started = time.perf_counter()
        child = subprocess.Popen(command)
        sampled: dict = {}
        sampler = threading.Thread(target=sample_memory, args=(child.pid, sampled), daemon=True)
        sampler.start()
        status = child.wait()
        sampler.join(timeout=1)
        seconds = time.perf_counter() - started
        if status != 0:
            raise SystemExit(f"build failed with status {status}")
        data_bytes = os.path.getsize(os.path.join(out, "model.onnx.data"))
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    gib = 2**30
    result = {"layers": args.layers, "build_seconds": round(seconds, 1), "onnx_data_bytes": data_bytes,
              "peak_rss_bytes": sampled.get("peak_rss_bytes"), "peak_anon_bytes": sampled.get("peak_anon_bytes"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / gib:.0f} GiB"}
    print(json.dumps(result, indent=2))
    verdict = "PASS" if result["peak_rss_bytes"] < 8 * gib else "FAIL"
    print(f"export of {data_bytes / gib:.2f} GiB fp16 weights: {seconds:.0f}s, peak RSS "
          f"{result['peak_rss_bytes'] / gib:.2f} GiB, peak anonymous {result['peak_anon_bytes'] / gib:.2f} GiB "
          f"(target < 8 GiB: {verdict})")


if __name__ == "__main__":
    main()
