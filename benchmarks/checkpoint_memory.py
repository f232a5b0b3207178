"""Peak memory of loading a Persimmon-8B-shaped checkpoint (random weights, written here).

    .venv/bin/python benchmarks/checkpoint_memory.py --dir /tmp/persimmon-8b-shaped [--layers 36] [--keep]

Writes an 8B-shaped bf16 checkpoint in 2 GiB safetensors shards (about 18.8 GB; scale it down
with --layers), then loads it in a fresh process with `load_model` and reports wall time, peak
RSS (ru_maxrss, which also counts memory-mapped file pages) and peak anonymous memory (sampled
RssAnon: what the process really holds). Deletes the checkpoint unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

LOADER = r"""
import json, resource, sys, threading, time
import torch
from persimmon_export.load.checkpoint import load_model

peak_anon = 0
def sample():
    global peak_anon
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
model = load_model(sys.argv[1])
seconds = time.perf_counter() - t0
time.sleep(0.2)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"load_seconds": round(seconds, 1), "weight_bytes": weights,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_anon_bytes": peak_anon}))
"""


def write_checkpoint(directory: str, layers: int, extra_files: dict | None = None) -> float:
    import torch

    from persimmon_export import PersimmonConfig, PersimmonForCausalLM
    from persimmon_export.load.checkpoint import save_checkpoint

    config = PersimmonConfig(num_hidden_layers=layers, torch_dtype="bfloat16")  # 8B shape by default
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PersimmonForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            yield name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    t0 = time.perf_counter()
    save_checkpoint(tensors(), config, directory, max_shard_bytes=2 * 2**30, extra_files=extra_files)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/persimmon-8b-shaped")
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    try:
        if not os.path.exists(os.path.join(args.dir, "config.json")):
            print(f"writing {args.layers}-layer 8B-shaped checkpoint to {args.dir} ...", flush=True)
            print(f"  written in {write_checkpoint(args.dir, args.layers):.0f}s", flush=True)
        print("loading in a fresh process ...", flush=True)
        out = subprocess.run([sys.executable, "-c", LOADER, args.dir], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    gib = 2**30
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, " \
                        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / gib:.0f} GiB"
    print(json.dumps(result, indent=2))
    print(f"weights {result['weight_bytes'] / gib:.2f} GiB; peak anonymous memory "
          f"{result['peak_anon_bytes'] / gib:.2f} GiB ({result['peak_anon_bytes'] / result['weight_bytes']:.2f}x); "
          f"peak RSS incl. mapped file pages {result['peak_rss_bytes'] / gib:.2f} GiB; "
          f"load {result['load_seconds']}s")


if __name__ == "__main__":
    main()
