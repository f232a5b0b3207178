"""Decode step time vs KV cache capacity on the onnxruntime runtime (CPU).

    .venv/bin/python benchmarks/decode_capacity.py [--context 200] [--steps 32] [--capacities 256 4096]

Builds a ~134M-parameter Persimmon (random weights, fp32; --config for another shape) once per
capacity, prefills the same `--context` tokens, then times decode steps. With the cache updated
in place and attention reading only the slots in use, the step time must not grow with capacity:
target ratio (largest / smallest capacity) <= 1.3. For contrast, the largest build is also timed
with a plain `session.run` (no IO binding), which copies every cache tensor in and out each step.
Writes benchmarks/results/decode_capacity.json.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from cli import BenchmarkParser, write_json
from machine import machine, timed
from workload import CONFIGS, VOCAB

from persimmon_export import PersimmonConfig
from persimmon_export.build import build
from persimmon_export.demo import random_model, train_tokenizer
from persimmon_export.load.checkpoint import save_model, tokenizer_files
from persimmon_export.options import BuildOptions  # noqa: E402
from persimmon_runtime import Tokenizer
from persimmon_runtime.backends import decode, prefill
from persimmon_runtime.backends.step import step_feeds
from persimmon_runtime.generator import Generator

SHAPES = {"134M": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
          **CONFIGS}


def measure_capacity(config: PersimmonConfig, context: int, steps: int, capacities) -> dict:
    """Median decode step seconds per capacity (in place), plus plain session.run at the largest."""
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, context).tolist()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        tokenizer = Tokenizer(train_tokenizer(os.path.join(work, "sp.model")))
        checkpoint = save_model(random_model(config, seed=0), os.path.join(work, "ckpt"),
                                extra_files=tokenizer_files(tokenizer))
        for capacity in capacities:
            out = os.path.join(work, f"build-{capacity}")
            build(checkpoint, out, BuildOptions(dtype="float32", backend="onnxruntime", max_batch=1,
                                                kv_capacity=capacity))
            generator = Generator.load(out)
            logits, positions = prefill(generator.backend, [prompt])
            token = logits.argmax(-1)
            positions_at_start = positions.copy()

            def step():  # same context every time: rewind the write slot
                positions[:] = positions_at_start
                decode(generator.backend, token, positions)

            results[f"io_binding_capacity_{capacity}"] = timed(step, steps)
            print(f"capacity {capacity:5d}: {results[f'io_binding_capacity_{capacity}'] * 1e3:.1f} ms/step "
                  f"(in place, IO binding)", flush=True)
        # contrast: the same largest build through plain session.run with full-capacity caches,
        # copied in and out every step (what a naive runtime does)
        session, manifest = generator.backend.session, generator.manifest
        cache = np.zeros((1, *manifest.cache_shape), np.float32)
        feeds = {**step_feeds(manifest.step_inputs, np.array([[int(token[0])]]), positions_at_start,
                              np.ones(1, np.int64), np.ones((1, capacity), np.int64)),
                 **{name: cache for name in manifest.cache_inputs}}
        results[f"session_run_capacity_{capacity}"] = timed(lambda: session.run(["logits"], feeds), steps)
        print(f"capacity {capacity:5d}: {results[f'session_run_capacity_{capacity}'] * 1e3:.1f} ms/step "
              f"(plain session.run: caches copied)")
    small, large = min(capacities), max(capacities)
    ratio = results[f"io_binding_capacity_{large}"] / results[f"io_binding_capacity_{small}"]
    return {"context": context, "steps": steps, "median_step_seconds": results, "ratio": round(ratio, 3),
            "target": 1.3, "pass": ratio <= 1.3}


def main() -> None:
    parser = BenchmarkParser(__doc__, "decode_capacity.json", dict(config="30M", context=16, steps=2,
                                                                   capacities=[32, 64]))
    parser.add_argument("--config", default="134M", choices=list(SHAPES), help="the model's shape (default 134M)")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--capacities", type=int, nargs="+", default=[256, 4096])
    args = parser.parse_args()
    config = PersimmonConfig(vocab_size=VOCAB, max_position_embeddings=8192, **SHAPES[args.config])
    report = measure_capacity(config, args.context, args.steps, args.capacities)
    report["config"] = args.config
    report["params"] = sum(p.numel() for p in random_model(config).parameters())
    report["machine"] = machine()
    write_json(args.json, report)
    small, large = min(args.capacities), max(args.capacities)
    print(f"ratio capacity {large} / {small}: {report['ratio']:.2f} "
          f"(target <= 1.3: {'PASS' if report['pass'] else 'FAIL'})")


if __name__ == "__main__":
    main()
