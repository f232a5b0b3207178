"""Weight-only int8 / int4 builds against fp32: decode speed and accuracy, and the choices behind
`persimmon_export.graph.quantize` (whether lm_head is quantized, the block size).

    .venv/bin/python benchmarks/quantized.py                       # 100M and 300M, every variant
    .venv/bin/python benchmarks/quantized.py --configs 100M --variants fp32 int8 int4

Per config (benchmarks/workload.py, random weights, vocabulary 32000) and variant: decode
tokens/s at batch 1 after a --prompt-token prompt (default 1024; the onnxruntime backend's step: the median over
--rounds rounds of --steps steps, the variants timed in turn each round), the build's weight
bytes, and accuracy against the fp32 torch reference
(`persimmon-export parity`: max |dlogit| / max |logit|, top-1 agreement, greedy rows identical
over its three prompts and 8 decode steps). Prints one line per variant with the cores other work
used meanwhile, and writes benchmarks/results/quantized.json. Against OpenVINO's int8 / int4:
`benchmarks/run.py --quick --prompts 1024 --new-tokens 64 --precisions int8 int4 --openvino int8 int4`.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cache_layouts import decode_times  # noqa: E402
from cli import BenchmarkParser, write_json  # noqa: E402
from machine import CpuShare, cpu_note, machine  # noqa: E402
from workload import CONFIGS, prompt_texts, random_checkpoint  # noqa: E402

from persimmon_export.graph import quantize  # noqa: E402
from persimmon_export.build import build  # noqa: E402
from persimmon_export.options import BuildOptions  # noqa: E402
from persimmon_export.validate.parity import BOUNDS, check_parity  # noqa: E402
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
INT8_COMPUTE = quantize.INT8_COMPUTE


def weight_bytes(build_dir: str) -> int:
    return os.path.getsize(os.path.join(build_dir, "model.onnx.data"))


def build_variant(checkpoint: str, work: str, label: str, tokens: int) -> str:
    out = os.path.join(work, label)
    options = dict(VARIANTS[label])
    quantize.INT8_COMPUTE = options.pop("accuracy_level", INT8_COMPUTE)
    try:
        build(checkpoint, out, BuildOptions(dtype="float32", backend="onnxruntime", max_batch=4,
                                            kv_capacity=tokens + 8, overwrite=True, **options))
    finally:
        quantize.INT8_COMPUTE = INT8_COMPUTE
    return out


def time_round_robin(builds: dict, prompt: list[int], steps: int, rounds: int) -> dict:
    """{label: (tokens/s of the median decode step, cpu share)}: every variant timed once per round,
    in turn, so that other work on a shared machine falls on all of them alike."""
    times = {label: [] for label in builds}
    share = CpuShare()
    for _ in range(rounds):
        for label, out in builds.items():
            backend = Generator.load(out).backend
            times[label].extend(decode_times(backend, [prompt], steps))
            del backend  # one session in memory at a time
    cpu = share.result()
    return {label: (1.0 / float(np.median(values)), cpu) for label, values in times.items()}


def accuracy(checkpoint: str, out: str) -> dict:
    [parity] = check_parity(checkpoint, out, decode_steps=8)
    return {"max_abs_diff": parity.max_abs_diff, "relative_diff": parity.max_abs_diff / _largest_logit(parity),
            "top1": parity.top1_agreement, "greedy_rows_identical": parity.greedy_rows_identical,
            "rows": parity.rows}


def _largest_logit(parity) -> float:
    """max |logit| of the reference over the parity run, read back from a relative bound
    (bound = factor x max |logit|); fp32's bound is absolute, so a relative figure needs --max-abs-diff."""
    spec = BOUNDS[parity.dtype.rpartition("/")[2]]
    return parity.bound / spec["max_abs"] if spec["relative"] else float("nan")


def main() -> None:
    parser = BenchmarkParser(__doc__.split("\n\n")[0], "quantized.json",
                             dict(configs=["30M"], variants=["fp32", "int4"], steps=2, rounds=1, prompt=32))
    parser.add_argument("--configs", nargs="+", default=["100M", "300M"], choices=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per round (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the variants, in turn (default 3)")
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens before the decode steps (default 1024)")
    parser.add_argument("--speed-only", action="store_true", help="skip the accuracy (parity) runs")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {machine()}", flush=True)
    results = {"machine": machine(), "prompt_tokens": args.prompt, "configs": {}}
    with tempfile.TemporaryDirectory() as work:
        for name in args.configs:
            checkpoint, first_added = random_checkpoint(work, name)
            tokenizer_file = os.path.join(checkpoint, "tokenizer.model")
            [text] = prompt_texts(tokenizer_file, first_added, 1, args.prompt, seed=args.prompt)
            prompt = Tokenizer(tokenizer_file).encode(text)
            builds = {label: build_variant(checkpoint, os.path.join(work, name), label, len(prompt) + args.steps)
                      for label in args.variants}
            rates = time_round_robin(builds, prompt, args.steps, args.rounds)
            rows = results["configs"][name] = {}
            for label, out in builds.items():
                rate, cpu = rates[label]
                row = rows[label] = {"decode_tok_s": rate, "weight_bytes": weight_bytes(out), "cpu": cpu}
                if not args.speed_only:
                    row.update(accuracy(checkpoint, out))
                speedup = rate / rates["fp32"][0] if "fp32" in rates else float("nan")
                figures = "" if args.speed_only else (
                    f"  max|dlogit| {row['max_abs_diff']:.3g} ({row['relative_diff']:.2%} of max|logit|)  top-1 "
                    f"{row['top1']:.1%}  greedy rows {row['greedy_rows_identical']}/{row['rows']}")
                print(f"{name} {label:18s} decode {rate:7.2f} tok/s ({speedup:.2f}x fp32)  weights "
                      f"{row['weight_bytes'] / 2**20:7.1f} MiB{figures}  {cpu_note(cpu)}", flush=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
