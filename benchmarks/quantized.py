"""Weight-only int8 / int4 builds against fp32: decode speed and accuracy, and the choices behind
`persimmon_export.quantize` (whether lm_head is quantized, the block size).

    .venv/bin/python benchmarks/quantized.py                       # 100M and 300M, every variant
    .venv/bin/python benchmarks/quantized.py --configs 100M --variants fp32 int8 int4

Per config (benchmarks/workload.py, random weights, vocabulary 32000) and variant: decode
tokens/s at batch 1 after a 1024-token prompt (the onnxruntime backend's step, median of
--steps steps), the build's weight bytes, and accuracy against the fp32 torch reference
(`persimmon-export parity`: max |dlogit| / max |logit|, top-1 agreement, greedy rows identical
over its three prompts and 8 decode steps). Prints one line per variant with the cores other work
used meanwhile, and writes benchmarks/results/quantized.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cache_layouts import decode_times  # noqa: E402
from machine import CpuShare, cpu_note, machine  # noqa: E402
from workload import CONFIGS, prompt_texts, random_checkpoint  # noqa: E402

from persimmon_export import quantize  # noqa: E402
from persimmon_export.build import build  # noqa: E402
from persimmon_export.parity import BOUNDS, check_parity  # noqa: E402
from persimmon_runtime import Tokenizer  # noqa: E402
from persimmon_runtime.generator import Generator  # noqa: E402

# label -> build options; accuracy_level: MatMulNBits' (quantize.INT8_COMPUTE, 4: int8 activations)
VARIANTS = {
    "fp32": {},
    "int8": {"weights": "int8"},
    "int8-lm_head-fp32": {"weights": "int8", "quantize_lm_head": False},
    "int8-accuracy0": {"weights": "int8", "accuracy_level": 0},
    "int4": {"weights": "int4"},
    "int4-lm_head-fp32": {"weights": "int4", "quantize_lm_head": False},
    "int4-accuracy0": {"weights": "int4", "accuracy_level": 0},
    "int4-block64": {"weights": "int4", "block_size": 64},
    "int4-block128": {"weights": "int4", "block_size": 128},
}
PROMPT_TOKENS = 1024
INT8_COMPUTE = quantize.INT8_COMPUTE


def decode_rate(build_dir: str, prompt: list[int], steps: int) -> float:
    """Tokens/s of single-row decode steps after `prompt`: the median step."""
    return 1.0 / float(np.median(decode_times(Generator.load(build_dir).backend, [prompt], steps)))


def weight_bytes(build_dir: str) -> int:
    return os.path.getsize(os.path.join(build_dir, "model.onnx.data"))


def run_variant(checkpoint: str, prompt: list[int], work: str, label: str, steps: int) -> dict:
    out = os.path.join(work, label)
    options = dict(VARIANTS[label])
    quantize.INT8_COMPUTE = options.pop("accuracy_level", INT8_COMPUTE)
    build(checkpoint, out, dtype="float32", backend="onnxruntime", max_batch=4,
          kv_capacity=PROMPT_TOKENS + steps + 8, overwrite=True, **options)
    quantize.INT8_COMPUTE = INT8_COMPUTE
    share = CpuShare()
    rate = decode_rate(out, prompt, steps)
    cpu = share.result()
    [parity] = check_parity(checkpoint, out, decode_steps=8)
    row = {"decode_tok_s": rate, "weight_bytes": weight_bytes(out), "max_abs_diff": parity.max_abs_diff,
           "top1": parity.top1_agreement, "greedy_rows_identical": parity.greedy_rows_identical,
           "rows": parity.rows, "cpu": cpu}
    row["relative_diff"] = parity.max_abs_diff / _largest_logit(parity)
    return row


def _largest_logit(parity) -> float:
    """max |logit| of the reference over the parity run, read back from a relative bound
    (bound = factor x max |logit|); fp32's bound is absolute, so a relative figure needs --max-abs-diff."""
    spec = BOUNDS[parity.dtype.rpartition("/")[2]]
    return parity.bound / spec["max_abs"] if spec["relative"] else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["100M", "300M"], choices=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed (default 24)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {machine()}", flush=True)
    results = {"machine": machine(), "prompt_tokens": PROMPT_TOKENS, "configs": {}}
    with tempfile.TemporaryDirectory() as work:
        for name in args.configs:
            checkpoint, first_added = random_checkpoint(work, name)
            tokenizer_file = os.path.join(work, "tokenizer-32000.model")
            [text] = prompt_texts(tokenizer_file, first_added, 1, PROMPT_TOKENS, seed=PROMPT_TOKENS)
            prompt = Tokenizer(tokenizer_file).encode(text)
            rows = results["configs"][name] = {}
            for label in args.variants:
                row = rows[label] = run_variant(checkpoint, prompt, os.path.join(work, name), label, args.steps)
                speedup = row["decode_tok_s"] / rows["fp32"]["decode_tok_s"] if "fp32" in rows else float("nan")
                print(f"{name} {label:18s} decode {row['decode_tok_s']:7.2f} tok/s ({speedup:.2f}x fp32)  weights "
                      f"{row['weight_bytes'] / 2**20:7.1f} MiB  max|dlogit| {row['max_abs_diff']:.3g} "
                      f"({row['relative_diff']:.2%} of max|logit|)  top-1 {row['top1']:.1%}  greedy rows "
                      f"{row['greedy_rows_identical']}/{row['rows']}  {cpu_note(row['cpu'])}", flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "quantized.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)


if __name__ == "__main__":
    main()
