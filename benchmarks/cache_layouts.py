"""The onnxruntime cache layouts end to end: prefill at 1024 tokens and decode step times around
the slots where `whole`-layout caches grow (1024 -> 1280 on the first step after a 1024-token
prompt, then every 256 slots), `whole` (MatMul/Softmax, grown by copying) against `capacity`
(GroupQueryAttention, allocated once), with transformers (SDPA) prefill beside them.

    .venv/bin/python benchmarks/cache_layouts.py --configs 100M 300M --steps 300

Random weights, fp32, batch 1, CPU; builds go to a temporary directory. Prints prefill tok/s
(best of --repeats) and, per layout, the first decode step's time and p50/p99 of the steps
after it, and of the 8 steps at each former growth point; writes benchmarks/results/cache_layouts.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cli import BenchmarkParser, write_json  # noqa: E402
from machine import cpu_features, machine  # noqa: E402
from workload import CONFIGS, VOCAB, random_checkpoint  # noqa: E402

from persimmon_export.build import build  # noqa: E402
from persimmon_export.options import BuildOptions  # noqa: E402
from persimmon_runtime.backends import decode, prefill  # noqa: E402
from persimmon_runtime.generator import Generator  # noqa: E402


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def decode_times(backend, ids: list[list[int]], steps: int) -> np.ndarray:
    """Seconds of each of `steps` decode steps after prefilling `ids` (fresh caches)."""
    logits, positions = prefill(backend, ids)
    tokens = logits.argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tokens = decode(backend, tokens, positions).argmax(-1)
        times.append(time.perf_counter() - start)
    return np.array(times)


def growth_points(prompt: int, steps: int) -> list[int]:
    """Indices of the decode steps that cross a 256-slot boundary (where `whole` caches grow)."""
    return [i for i in range(steps) if (prompt + i) % 256 == 0]


def summarize(times: np.ndarray, prompt: int) -> dict:
    ms = times * 1e3
    points = growth_points(prompt, len(times))
    if not points:
        raise SystemExit(f"no decode step crosses a 256-slot boundary after a {prompt}-token prompt: take more --steps")
    near = np.concatenate([ms[p:p + 8] for p in points])
    rest = np.delete(ms, [i for p in points for i in range(p, min(p + 8, len(ms)))])
    return {"first_step_ms": float(ms[0]), "growth_point_steps_ms": [float(ms[p]) for p in points],
            "growth_points_p50_ms": float(np.percentile(near, 50)),
            "growth_points_p99_ms": float(np.percentile(near, 99)),
            "elsewhere_p50_ms": float(np.percentile(rest, 50)), "elsewhere_p99_ms": float(np.percentile(rest, 99))}


def run_config(name: str, work: str, prompt: int, steps: int, repeats: int) -> list[dict]:
    import transformers

    checkpoint, _ = random_checkpoint(work, name)
    ids = np.random.default_rng(prompt).integers(100, VOCAB, (1, prompt)).tolist()
    hf = transformers.PersimmonForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    with torch.no_grad():
        seconds = best_of(lambda: hf(torch.tensor(ids), use_cache=True), repeats)
    print(f"{name} transformers (sdpa) prefill {prompt}: {prompt / seconds:8.1f} tok/s  load {os.getloadavg()[0]:.2f}",
          flush=True)
    rows = [{"config": name, "runtime": "transformers sdpa", "prefill_tok_s": prompt / seconds}]
    del hf
    for layout in ("whole", "capacity"):
        out = os.path.join(work, f"{name}-{layout}")
        build(checkpoint, out, BuildOptions(dtype="float32", backend="onnxruntime", max_batch=1,
                                            kv_capacity=prompt + steps + 8, cache_layout=layout))
        backend = Generator.load(out).backend
        seconds = best_of(lambda: prefill(backend, ids), repeats)
        print(f"{name} {layout:8s} prefill {prompt}: {prompt / seconds:8.1f} tok/s  load {os.getloadavg()[0]:.2f}",
              flush=True)
        figures = summarize(decode_times(backend, ids, steps), prompt)
        print(f"{name} {layout:8s} decode after {prompt}: first step {figures['first_step_ms']:7.1f} ms | steps at "
              f"growth points {[round(t, 1) for t in figures['growth_point_steps_ms']]} | p50/p99 at growth points "
              f"(8 steps each) {figures['growth_points_p50_ms']:.1f}/{figures['growth_points_p99_ms']:.1f} ms | "
              f"p50/p99 "
              f"elsewhere {figures['elsewhere_p50_ms']:.1f}/{figures['elsewhere_p99_ms']:.1f} ms  "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        rows.append({"config": name, "runtime": f"persimmon {layout}", "prefill_tok_s": prompt / seconds, **figures})
        del backend
    return rows


def main() -> None:
    parser = BenchmarkParser(__doc__, "cache_layouts.json", dict(configs=["30M"], prompt=254, steps=4, repeats=1))
    parser.add_argument("--configs", nargs="+", default=["100M", "300M"], choices=sorted(CONFIGS))
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [row for name in args.configs for row in run_config(name, work, args.prompt, args.steps, args.repeats)]
    write_json(args.json, {"machine": machine(), "cpu": cpu_features(), "prompt": args.prompt, "steps": args.steps,
                           "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
