"""Prefill in chunks: throughput at 1024 tokens and peak memory at 16K tokens (issue 12).

    .venv/bin/python benchmarks/prefill.py          # both parts; writes benchmarks/results/prefill.json
    .venv/bin/python benchmarks/prefill.py --quick  # fewer repeats

1. The "100M" config of benchmarks/run.py (random weights, fp32, onnxruntime CPU, batch 1):
   prefill tokens/s of a 1024-token prompt in one step and in chunks of 64..512, through the
   backend step the scheduler runs (each chunk writes at the row's next slot).
2. Where a newcomer's prefill chunk goes while 7 other rows decode (100M config, 8 rows, 256-token
   chunk, 512 tokens of context): one shared step (every row computes 256 positions, 255 of them
   padding for the decoding rows) against a step over the newcomer's row alone plus a decode step
   over all 8 rows. The scheduler does the latter.
3. A tiny 2-head model with a 16,384-slot cache: peak RSS of a fresh process that prefills a
   16K-token prompt through `Generator.generate(max_new_tokens=1)`, in one step
   (prefill_chunk=16384: what the runtime did before chunking) and with the default chunk.
--config, --prompt and --long-prompt change those sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cli import BenchmarkParser, write_json  # noqa: E402
from machine import cpu_model  # noqa: E402
from workload import CONFIGS, VOCAB  # noqa: E402

from persimmon_export import PersimmonConfig  # noqa: E402
from persimmon_export.build import build  # noqa: E402
from persimmon_export.demo import random_model, train_tokenizer  # noqa: E402
from persimmon_export.load.checkpoint import save_model, tokenizer_files  # noqa: E402
from persimmon_export.options import BuildOptions  # noqa: E402
from persimmon_runtime import Tokenizer  # noqa: E402
from persimmon_runtime.generator import Generator  # noqa: E402
from persimmon_runtime.scheduler import PREFILL_CHUNK  # noqa: E402

CHUNKS = (64, 128, 256, 512, 1024)


def make_build(root: str, name: str, config: dict, kv_capacity: int, max_batch: int = 1) -> str:
    tokenizer = Tokenizer(train_tokenizer(os.path.join(root, f"{name}.model")))
    model = random_model(PersimmonConfig(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.bos_id, **config), 0)
    checkpoint = save_model(model, os.path.join(root, f"{name}-ckpt"), extra_files=tokenizer_files(tokenizer))
    out = os.path.join(root, f"{name}-build")
    build(checkpoint, out, BuildOptions(dtype="float32", max_batch=max_batch, kv_capacity=kv_capacity,
                                        backend="onnxruntime"))
    return out


def prefill_seconds(backend, prompt: np.ndarray, chunk: int) -> float:
    backend.start(1)
    started = time.perf_counter()
    for start in range(0, len(prompt), chunk):
        piece = prompt[start:start + chunk]
        backend.step(piece[None], np.array([start]), np.array([len(piece)]), np.ones((1, start + len(piece)), np.int64))
    return time.perf_counter() - started


def throughput(backend, repeats: int, tokens: int) -> dict:
    prompt = np.random.default_rng(0).integers(3, VOCAB, tokens)
    results = {}
    for chunk in [c for c in CHUNKS if c <= tokens]:
        prefill_seconds(backend, prompt, chunk)  # warm-up
        best = min(prefill_seconds(backend, prompt, chunk) for _ in range(repeats))
        results[chunk] = len(prompt) / best
        print(f"  {tokens}-token prefill, chunk {chunk:5d}: {results[chunk]:8.0f} tok/s", flush=True)
    return results


def mixed_or_separate(backend, repeats: int, rows: int = 8, chunk: int = 256, context: int = 512) -> dict:
    """Seconds per round: the newcomer's chunk inside the decode step, or in a step of its own."""
    backend.start(rows)
    history = np.random.default_rng(2).integers(3, VOCAB, (rows, context))
    backend.step(history, np.zeros(rows, np.int64), np.full(rows, context), np.ones((rows, context), np.int64))
    chunk_ids = np.random.default_rng(3).integers(3, VOCAB, chunk)
    width = context + chunk
    mixed_ids = np.zeros((rows, chunk), np.int64)
    mixed_ids[0], mixed_ids[1:, 0] = chunk_ids, 7  # row 0 takes the chunk, the others one token each
    counts = np.array([chunk] + [1] * (rows - 1))

    def mixed():
        backend.step(mixed_ids, np.full(rows, context), counts, np.ones((rows, width), np.int64))

    def separate():
        backend.step(chunk_ids[None], np.array([context]), np.array([chunk]), np.ones((1, width), np.int64), 0)
        backend.step(np.full((rows - 1, 1), 7), np.full(rows - 1, context), np.ones(rows - 1, np.int64),
                     np.ones((rows - 1, context + 1), np.int64), 1)

    result = {}
    for name, run in (("mixed", mixed), ("separate", separate)):
        run()  # warm-up (writes the same slots every time)
        result[name] = min(_seconds(run) for _ in range(repeats))
        print(f"  newcomer chunk {name:8s}: {result[name] * 1e3:7.1f} ms per round", flush=True)
    return result


def _seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def peak_rss_child(build_dir: str, chunk: int) -> None:
    """Runs in a fresh process: prints {"tokens", "rss_before_mib", "peak_rss_mib"} as JSON (Linux)."""
    generator = Generator.load(build_dir, prefill_chunk=chunk)
    tokenizer = generator.tokenizer
    words = np.random.default_rng(1).choice(["alpha", "beta", "gamma", "delta", "fox", "dog", "東京", "7"], 20000)
    ids = tokenizer.encode(" ".join(words))[:generator.manifest.kv_capacity - 400]
    prompt = tokenizer.decode(ids)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS: the peak below is the prefill's
    loaded = _status_mib("VmRSS")
    completion = generator.generate(prompt, max_new_tokens=1, ignore_eos=True)
    print(json.dumps({"tokens": completion.prompt_tokens, "rss_before_mib": loaded, "peak_rss_mib": _status_mib("VmHWM")}))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_memory(root: str, capacity: int) -> dict:
    config = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=capacity)
    build_dir = make_build(root, "long", config, kv_capacity=capacity)
    results = {}
    for label, chunk in (("one_step", capacity), ("chunked", PREFILL_CHUNK)):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", build_dir, str(chunk)], check=True,
                             capture_output=True, text=True).stdout
        results[label] = {**json.loads(out.strip().splitlines()[-1]), "chunk": chunk,
                          "seconds": time.perf_counter() - started}
        print(f"  {capacity}-slot cache's long prompt, {label} (chunk {chunk}): peak RSS "
              f"{results[label]['peak_rss_mib']:.0f} MiB "
              f"({results[label]['tokens']} tokens)", flush=True)
    return results


def main() -> None:
    parser = BenchmarkParser(__doc__, "prefill.json", dict(config="30M", prompt=128, long_prompt=1024, quick=True))
    parser.add_argument("--quick", action="store_true", help="1 timed repeat instead of 3")
    parser.add_argument("--config", default="100M", choices=list(CONFIGS), help="parts 1 and 2 (default 100M)")
    parser.add_argument("--prompt", type=int, default=1024, help="part 1's prompt tokens (default 1024)")
    parser.add_argument("--long-prompt", type=int, default=16384, help="part 3's cache slots (default 16384)")
    parser.add_argument("--child", nargs=2, metavar=("BUILD", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return peak_rss_child(args.child[0], int(args.child[1]))
    repeats = 1 if args.quick else 3
    with tempfile.TemporaryDirectory() as root:
        config = dict(vocab_size=VOCAB, max_position_embeddings=max(4096, args.prompt), **CONFIGS[args.config])
        build_dir = make_build(root, args.config, config, kv_capacity=max(2048, args.prompt), max_batch=8)
        backend = Generator.load(build_dir).backend
        print(f"prefill throughput ({args.config} config):", flush=True)
        rates = throughput(backend, repeats, args.prompt)
        print(f"a newcomer's chunk beside 7 decoding rows ({args.config} config):", flush=True)
        placement = mixed_or_separate(backend, repeats)
        print(f"peak memory of a long prefill (2 heads, {args.long_prompt}-slot cache):", flush=True)
        memory = peak_memory(root, args.long_prompt)
    result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
              "config": args.config, "default_chunk": PREFILL_CHUNK, "prompt_tokens": args.prompt,
              "prefill_tok_s": rates,
              "newcomer_chunk_round_s": placement, "long_prompt_slots": args.long_prompt,
              "peak_rss_long_prompt": memory}
    write_json(args.json, result)


if __name__ == "__main__":
    main()
