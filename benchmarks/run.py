"""Speed and memory against the tools users would pick instead, measured in one run on this machine.

    bash benchmarks/run.sh             # = .venv/bin/python benchmarks/run.py (installs matplotlib first)
    .venv/bin/python benchmarks/run.py --configs 30M --quick         # a smoke run
    .venv/bin/python benchmarks/run.py --export-8b                    # also the 8B-shaped export (long)

For Persimmon configs of about 30M, 100M and 300M parameters (random weights, fp32, CPU):
prefill and decode tokens/s at batch 1 and 8 with prompts of 128 and 1024 tokens, for
  - this project's onnxruntime runtime (the backend step the Generator runs),
  - the project's torch reference with its static cache,
  - transformers `generate` with its default cache (prefill = generate 1 token; decode = the
    extra time per token of generate N+1 tokens);
decode step time vs cache capacity; the CPU memory-bandwidth roofline for decode (weights + KV
cache bytes read per token / bandwidth measured here) and each runtime's fraction of it.
Targets (printed PASS/FAIL): at batch 1 with 1024 tokens of context, onnxruntime decodes >= 1.5x
faster than transformers on the 100M config and is never slower on any config; on the 300M
config it reaches >= 60% of the roofline. Writes benchmarks/results/latest.json and latest.png.
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
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from decode_capacity import cpu_model, measure_capacity, timed  # noqa: E402

from persimmon_export import PersimmonConfig  # noqa: E402
from persimmon_export.build import build  # noqa: E402
from persimmon_export.checkpoint import save_model, tokenizer_files  # noqa: E402
from persimmon_export.demo import random_model, train_tokenizer  # noqa: E402
from persimmon_runtime import Tokenizer  # noqa: E402
from persimmon_runtime.backends import decode, prefill  # noqa: E402
from persimmon_runtime.generator import Generator  # noqa: E402

CONFIGS = {
    "30M": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
    "100M": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, intermediate_size=3072),
    "300M": dict(hidden_size=1024, num_hidden_layers=20, num_attention_heads=16, intermediate_size=4096),
}
VOCAB = 32000


def measure_bandwidth(gib: float = 2.0, repeats: int = 5) -> float:
    """Bytes/s of reading a large array with every core (a multi-threaded sum), the best of a few.

    Decode reads weights and cache once per token, so read bandwidth is its roofline.
    """
    data = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def prompts(batch: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(length * 10 + batch)
    return rng.integers(100, VOCAB, (batch, length)).tolist()


def bench_onnxruntime(generator: Generator, batch: int, length: int, steps: int, repeats: int) -> dict:
    ids = prompts(batch, length)
    backend = generator.backend
    prefill_time = timed(lambda: prefill(backend, ids), repeats)
    logits, positions = prefill(backend, ids)
    tokens, start = logits.argmax(-1), positions.copy()

    def one_step():
        positions[:] = start  # same context every step
        decode(backend, tokens, positions)

    step_time = timed(one_step, steps)
    return {"prefill_tok_s": batch * length / prefill_time, "decode_tok_s": batch / step_time}


@torch.no_grad()
def bench_torch(model, batch: int, length: int, steps: int, repeats: int) -> dict:
    ids = torch.tensor(prompts(batch, length))
    model.setup_cache(batch, length + 1)
    slots = torch.arange(length)
    prefill_time = timed(lambda: model(ids, cache_position=slots), repeats)
    token = model(ids, cache_position=slots)[:, -1].argmax(-1)[:, None]
    step = torch.tensor([length])
    step_time = timed(lambda: model(token, cache_position=step), steps)
    model.drop_cache()
    return {"prefill_tok_s": batch * length / prefill_time, "decode_tok_s": batch / step_time}


@torch.no_grad()
def bench_transformers(model, batch: int, length: int, steps: int, repeats: int) -> dict:
    ids = torch.tensor(prompts(batch, length))
    mask = torch.ones_like(ids)

    def generate(new):
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0)

    first = timed(lambda: generate(1), repeats)
    more = timed(lambda: generate(steps + 1), 1)
    return {"prefill_tok_s": batch * length / first, "decode_tok_s": batch * steps / max(more - first, 1e-9)}


def run_config(name: str, work: str, batches, lengths, steps: int, repeats: int, bandwidth: float) -> dict:
    import transformers

    config = PersimmonConfig(vocab_size=VOCAB, max_position_embeddings=4096, **CONFIGS[name])
    model = random_model(config, seed=0)
    params = sum(p.numel() for p in model.parameters())
    tokenizer = Tokenizer(train_tokenizer(os.path.join(work, "sp.model")))
    checkpoint = save_model(model, os.path.join(work, name), extra_files=tokenizer_files(tokenizer))
    out = os.path.join(work, f"{name}-build")
    build(checkpoint, out, dtype="float32", backend="onnxruntime", max_batch=max(batches),
          kv_capacity=max(lengths) + steps + 2)
    generator = Generator.load(out)
    hf = transformers.PersimmonForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    rows = []
    for batch in batches:
        for length in lengths:
            for runtime, bench in (("onnxruntime", lambda: bench_onnxruntime(generator, batch, length, steps, repeats)),
                                   ("torch-reference", lambda: bench_torch(model, batch, length, steps, repeats)),
                                   ("transformers", lambda: bench_transformers(hf, batch, length, steps, repeats))):
                result = bench()
                rows.append({"config": name, "runtime": runtime, "batch": batch, "prompt": length, **result})
                print(f"{name:5s} {runtime:16s} batch {batch} prompt {length:5d}: prefill "
                      f"{result['prefill_tok_s']:9.1f} tok/s, decode {result['decode_tok_s']:7.2f} tok/s", flush=True)
    # decode roofline at batch 1: every weight (but the embedding table, of which one row is
    # gathered) and the context's keys/values read once per token
    cache_bytes = 2 * config.num_hidden_layers * config.hidden_size * 4 * max(lengths)
    weight_bytes = (params - model.model.embed_tokens.weight.numel()) * 4
    roofline = bandwidth / (weight_bytes + cache_bytes)
    for row in rows:
        if row["batch"] == 1 and row["prompt"] == max(lengths):
            row["roofline_tok_s"] = roofline
            row["roofline_fraction"] = row["decode_tok_s"] / roofline
    return {"params": params, "rows": rows, "roofline_decode_tok_s": roofline}


def targets(results: dict, context: int) -> list[tuple[str, bool, str]]:
    def decode(config, runtime):
        return next(r["decode_tok_s"] for r in results[config]["rows"]
                    if r["runtime"] == runtime and r["batch"] == 1 and r["prompt"] == context)

    checks = []
    if "100M" in results:
        ratio = decode("100M", "onnxruntime") / decode("100M", "transformers")
        checks.append(("100M: onnxruntime decode >= 1.5x transformers (batch 1, 1024 context)", ratio >= 1.5,
                       f"{ratio:.2f}x"))
    for config in results:
        ratio = decode(config, "onnxruntime") / decode(config, "transformers")
        checks.append((f"{config}: onnxruntime decode not slower than transformers", ratio >= 1.0, f"{ratio:.2f}x"))
    if "300M" in results:
        fraction = decode("300M", "onnxruntime") / results["300M"]["roofline_decode_tok_s"]
        checks.append(("300M: onnxruntime decode >= 60% of the bandwidth roofline", fraction >= 0.6,
                       f"{fraction:.0%}"))
    return checks


def chart(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    runtimes = ["onnxruntime", "torch-reference", "transformers"]
    labels = [(c, b, p) for c in results for b in sorted({r["batch"] for r in results[c]["rows"]})
              for p in sorted({r["prompt"] for r in results[c]["rows"]})]
    x = np.arange(len(labels))
    for ax, metric in zip(axes, ("prefill_tok_s", "decode_tok_s")):
        for i, runtime in enumerate(runtimes):
            values = [next(r[metric] for r in results[c]["rows"] if r["runtime"] == runtime and r["batch"] == b
                           and r["prompt"] == p) for c, b, p in labels]
            ax.bar(x + (i - 1) * 0.27, values, 0.27, label=runtime)
        ax.set_xticks(x, [f"{c} b{b} p{p}" for c, b, p in labels], fontsize=7, rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_title(metric.replace("_tok_s", " tokens/s (log)"))
        ax.legend(fontsize=8)
    fig.suptitle(f"Persimmon on CPU ({platform.machine()}, {os.cpu_count()} cores), fp32, random weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="batch 1 only, prompt 128 and 1024, fewer steps")
    parser.add_argument("--export-8b", action="store_true", help="also measure the 8B-shaped export (minutes)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    batches, lengths = ([1], [128, 1024]) if args.quick else ([1, 8], [128, 1024])
    steps, repeats = (4, 1) if args.quick else (8, 2)
    bandwidth = measure_bandwidth()
    print(f"memory read bandwidth ({os.cpu_count()} threads): {bandwidth / 1e9:.1f} GB/s", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.configs:
            results[name] = run_config(name, work, batches, lengths, steps, repeats, bandwidth)
    capacity = measure_capacity(context=200, steps=32, capacities=[256, 1024, 4096])
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}",
              "bandwidth_bytes_s": bandwidth, "configs": results, "decode_vs_capacity": capacity,
              "gpu": "not measured: no GPU on this machine" if not torch.cuda.is_available() else "see plugins"}
    if args.export_8b:
        out = subprocess.run([sys.executable, os.path.join(HERE, "export_memory.py")], capture_output=True, text=True)
        report["export_8b"] = json.loads(out.stdout[out.stdout.index("{"):out.stdout.rindex("}") + 1])
    report["targets"] = [{"target": t, "pass": ok, "measured": m} for t, ok, m in targets(results, max(lengths))]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "latest.json"), "w") as f:
        json.dump(report, f, indent=2)
    try:
        chart(results, os.path.join(HERE, "results", "latest.png"))
    except ImportError:
        print("matplotlib not installed: no chart (bash benchmarks/run.sh installs it)")
    print()
    for item in report["targets"]:
        print(f"{'PASS' if item['pass'] else 'FAIL'}  {item['target']}: {item['measured']}")


if __name__ == "__main__":
    main()
