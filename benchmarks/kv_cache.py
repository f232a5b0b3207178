"""Decode against context length, per KV-cache precision (issue 28): fp32 and int4 weights, each
with the cache in fp32 and in int8 (`build --kv-cache int8`), batch 1, prompts of each --contexts
length, --new-tokens greedy tokens, on this project's Generator (scheduler step times).

For each run: decode tokens/s, step p50, and the fraction of the bandwidth bound it reaches - the
bytes a decode step must read (every linear weight as stored, and the cache up to the mean
context: layers x 2 x context x hidden x cache bytes) over the machine's measured read bandwidth.
Writes benchmarks/results/kv_cache.json (or --json; --smoke: a quick check that it runs) and, beside
it (the same name, .png): step time against the bytes the step reads, per build (the step-time-vs-bytes plot).

    .venv/bin/python benchmarks/kv_cache.py --contexts 1024 4096
"""

from __future__ import annotations

import os
import sys
import tempfile
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cli import BenchmarkParser, write_json  # noqa: E402
from machine import cpu_features, machine, measure_bandwidth  # noqa: E402
from run import time_ours  # noqa: E402
from step_timing import median_run  # noqa: E402
from workload import CONFIGS, prompt_texts, random_checkpoint  # noqa: E402

from persimmon_export.build import build  # noqa: E402
from persimmon_export.options import BuildOptions  # noqa: E402
from persimmon_runtime.generator import Generator  # noqa: E402

BUILDS = {"fp32 weights, fp32 cache": {}, "fp32 weights, int8 cache": {"kv_cache": "int8"},
          "int4 weights, fp32 cache": {"weights": "int4"},
          "int4 weights, int8 cache": {"weights": "int4", "kv_cache": "int8"}}
SMOKE = dict(config="30M", contexts=[32], new_tokens=4, repeats=1, bandwidth_gib=1 / 16)


def stored_weight_bytes(directory: str, vocab: int, hidden: int) -> int:
    """Bytes of the build's weights a decode step reads besides the cache: model.onnx.data but the
    fp32 embedding table, of which a step gathers one row."""
    return os.path.getsize(os.path.join(directory, "model.onnx.data")) - vocab * hidden * 4


def main() -> None:
    parser = BenchmarkParser(__doc__, "kv_cache.json", SMOKE)
    parser.add_argument("--config", default="100M", choices=list(CONFIGS))
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median decode tok/s is kept")
    parser.add_argument("--builds", nargs="+", default=list(BUILDS), choices=list(BUILDS), metavar="BUILD",
                        help=f"which builds (default all: {', '.join(repr(b) for b in BUILDS)})")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="the bandwidth probe's matrix (default 1)")
    args = parser.parse_args()
    bandwidth = measure_bandwidth(args.bandwidth_gib)["best"]
    config = CONFIGS[args.config]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        checkpoint, first_added = random_checkpoint(work, args.config, max_position_embeddings=max(args.contexts) * 2)
        tokenizer_file = os.path.join(work, [f for f in os.listdir(work) if f.endswith(".model")][0])
        capacity = max(args.contexts) + args.new_tokens
        for label in args.builds:
            options = BUILDS[label]
            out = os.path.join(work, label.replace(" ", "").replace(",", "-"))
            build(checkpoint, out, BuildOptions(dtype="float32", backend="onnxruntime", max_batch=1,
                                                kv_capacity=capacity, prefill="none", **options))
            generator = Generator.load(out, prefill="off")
            slot_bytes = 2 * config["num_hidden_layers"] * config["hidden_size"] * (1 if "int8 cache" in label else 4)
            for context in args.contexts:
                text = prompt_texts(tokenizer_file, first_added, 1, context, seed=context)[0]
                figures, _ = median_run(partial(time_ours, generator, [text], args.new_tokens), args.repeats)
                mean_context = context + args.new_tokens / 2
                step_bytes = (stored_weight_bytes(out, generator.manifest.model.vocab_size, config["hidden_size"])
                              + slot_bytes * mean_context)
                bound = bandwidth / step_bytes
                row = {"build": label, "context": context, "decode_tok_s": figures["decode_tok_s"],
                       "step_p50_ms": figures["step_p50_ms"], "step_bytes": step_bytes, "bound_tok_s": bound,
                       "bound_fraction": figures["decode_tok_s"] / bound,
                       "cache_mb_per_sequence_at_capacity": slot_bytes * capacity / 1e6}
                rows.append(row)
                print(f"{label:26s} context {context:5d}: decode {row['decode_tok_s']:7.1f} tok/s, step p50 "
                      f"{row['step_p50_ms']:.2f} ms, {row['bound_fraction']:.0%} of the {bound:.0f} tok/s bound",
                      flush=True)
            generator.close()
    report = {"machine": machine(), "cpu": cpu_features(), "bandwidth_bytes_s": bandwidth, "config": args.config,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows}
    write_json(args.json, report)
    try:
        plot(rows, bandwidth, os.path.splitext(args.json)[0] + ".png", f"{args.config}, {machine()}")
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")


def plot(rows: list[dict], bandwidth: float, path: str, title: str) -> None:
    """Decode step time against the bytes the step must read, one series per build, with the line
    of reading those bytes at the measured bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(row["build"] for row in rows):
        mine = [row for row in rows if row["build"] == label]
        ax.plot([r["step_bytes"] / 1e6 for r in mine], [r["step_p50_ms"] for r in mine], "o-", label=label)
        for r in mine:
            ax.annotate(str(r["context"]), (r["step_bytes"] / 1e6, r["step_p50_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
    largest = max(row["step_bytes"] for row in rows)
    ax.plot([0, largest / 1e6], [0, largest / bandwidth * 1e3], "k--", linewidth=1,
            label=f"bound: the bytes at {bandwidth / 1e9:.1f} GB/s")
    ax.set_xlabel("bytes a decode step reads: weights + cache up to the context (MB)")
    ax.set_ylabel("decode step p50 (ms)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
