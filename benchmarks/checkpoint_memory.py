"""Peak memory of loading a Persimmon-8B-shaped checkpoint (random weights, written here).

    .venv/bin/python benchmarks/checkpoint_memory.py [--dir /tmp/persimmon-8b-shaped] [--layers 36] [--keep]

Writes an 8B-shaped bf16 checkpoint in 2 GiB safetensors shards (about 18.8 GB; scale it down
with --layers) unless --dir already holds a checkpoint, then loads it in a fresh process with
`load_model` and reports wall time, peak RSS (ru_maxrss, which also counts memory-mapped file
pages) and peak anonymous memory (sampled RssAnon: what the process really holds). Deletes the
checkpoint it wrote unless --keep (a checkpoint it found is left alone). Writes
benchmarks/results/checkpoint_memory.json.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from cli import BenchmarkParser, write_json
from workload import SHAPES, shape_sizes

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


def checkpoint_config(shape: str, layers: int | None):
    """The PersimmonConfig of a random bf16 checkpoint: `shape` "8B" or a benchmarks/workload.py
    config, with `layers` layers (None: the shape's own)."""
    from persimmon_export import PersimmonConfig

    return PersimmonConfig(**{**shape_sizes(shape), **({"num_hidden_layers": layers} if layers else {}),
                              "torch_dtype": "bfloat16"})


def parameter_shapes(config) -> dict:
    import torch

    from persimmon_export import PersimmonForCausalLM

    with torch.device("meta"):
        return {k: v.shape for k, v in PersimmonForCausalLM(config).state_dict().items()}


def write_checkpoint(directory: str, layers: int | None, extra_files: dict | None = None, shape: str = "8B") -> float:
    """Write a random bf16 checkpoint (checkpoint_config); returns the seconds it took."""
    import torch

    from persimmon_export.load.checkpoint import save_checkpoint

    config = checkpoint_config(shape, layers)
    shapes = parameter_shapes(config)
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            yield name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    t0 = time.perf_counter()
    save_checkpoint(tensors(), config, directory, max_shard_bytes=2 * 2**30, extra_files=extra_files)
    return time.perf_counter() - t0


def main() -> None:
    parser = BenchmarkParser(__doc__, "checkpoint_memory.json", dict(shape="30M", layers=2))
    parser.add_argument("--dir", default="",
                        help="a checkpoint to load, or where to write one (default: a new temporary folder)")
    parser.add_argument("--shape", default="8B", choices=SHAPES, help="the checkpoint written (default 8B)")
    parser.add_argument("--layers", type=int,
                        help="layers of the checkpoint written (default: the shape's own, 36 at 8B)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint this run wrote")
    args = parser.parse_args()
    directory = args.dir or os.path.join(tempfile.mkdtemp(prefix="persimmon-checkpoint-"), "checkpoint")
    wrote = not os.path.exists(os.path.join(directory, "config.json"))
    layers = checkpoint_config(args.shape, args.layers).num_hidden_layers
    try:
        if wrote:
            if os.path.exists(directory):
                wrote = False  # nothing of ours to delete
                raise SystemExit(f"--dir {directory}: exists and holds no checkpoint (no config.json); pass a "
                                 "checkpoint or a folder that does not exist yet")
            print(f"writing {layers}-layer {args.shape}-shaped checkpoint to {directory} ...", flush=True)
            print(f"  written in {write_checkpoint(directory, args.layers, shape=args.shape):.0f}s", flush=True)
        print("loading in a fresh process ...", flush=True)
        out = subprocess.run([sys.executable, "-c", LOADER, directory], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if args.keep and wrote:
            print(f"kept the checkpoint in {directory} (load it again with --dir {directory})", flush=True)
        elif wrote:  # never what we did not write
            shutil.rmtree(os.path.dirname(directory) if not args.dir else directory, ignore_errors=True)
    gib = 2**30
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, " \
                        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / gib:.0f} GiB"
    result.update(shape=args.shape if wrote else f"loaded from {directory}", layers=layers if wrote else None)
    write_json(args.json, result)
    print(f"weights {result['weight_bytes'] / gib:.2f} GiB; peak anonymous memory "
          f"{result['peak_anon_bytes'] / gib:.2f} GiB ({result['peak_anon_bytes'] / result['weight_bytes']:.2f}x); "
          f"peak RSS incl. mapped file pages {result['peak_rss_bytes'] / gib:.2f} GiB; "
          f"load {result['load_seconds']}s")


if __name__ == "__main__":
    main()
