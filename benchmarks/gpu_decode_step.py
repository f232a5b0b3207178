"""How long one decode step of Persimmon-8B takes on a GPU, beside what sampling its logits costs.

    python benchmarks/gpu_decode_step.py [--batches 1 8] [--context 1024]   # needs a CUDA GPU and torch

The model is this project's torch reference (exporter/persimmon_export/reference/model.py) with the real
8B shape (36 layers, hidden 4096, vocabulary 262,144) and random fp16 weights, run eagerly with
its static KV cache: no CUDA graphs and attention over every cache slot, so this is an upper
bound on what the TensorRT engine takes per step. The point is the budget it sets: the runtime
samples on the host (numpy) after every step, so sampling must cost a small fraction of it
(benchmarks/sampling.py measures sampling). Prints a table and writes
benchmarks/results/gpu_decode_step.json.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "exporter"))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "runtime"))
from cli import BenchmarkParser, write_json  # noqa: E402
from workload import SHAPES, shape_sizes  # noqa: E402

from persimmon_export.config import PersimmonConfig  # noqa: E402
from persimmon_export.reference.model import PersimmonForCausalLM  # noqa: E402
from persimmon_runtime.sampling import Sampler, SamplingParams, sample  # noqa: E402

SETTINGS = {"greedy": {}, "top-p 0.9": dict(temperature=0.8, top_p=0.9, seed=0),
            "top-k 50": dict(temperature=0.8, top_k=50, seed=0)}


@torch.inference_mode()
def decode_ms(model, batch: int, context: int, steps: int = 20) -> tuple[float, np.ndarray]:
    """Median ms of a decode step at `context` tokens of cache, and the last step's logits."""
    model.setup_cache(batch, context + steps + 8, dtype=torch.float16, device="cuda")
    ids = torch.randint(3, model.config.vocab_size, (batch, context), device="cuda")
    logits = model(ids, cache_position=torch.arange(context, device="cuda"))[:, -1]
    times = []
    for step in range(steps):
        token = logits.argmax(-1, keepdim=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits = model(token, cache_position=torch.tensor([context + step], device="cuda"))[:, -1]
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    model.drop_cache()
    return float(np.median(times[3:])), logits.float().cpu().numpy()


def sample_ms(logits: np.ndarray, settings: dict, repeats: int = 20) -> float:
    samplers = [Sampler(SamplingParams(**settings), prompt_index=row) for row in range(len(logits))]
    histories = [np.zeros(0, np.int64)] * len(logits)
    sample(logits, samplers, histories)
    started = time.perf_counter()
    for _ in range(repeats):
        sample(logits, samplers, histories)
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    parser = BenchmarkParser(__doc__, "gpu_decode_step.json", dict(shape="30M", batches=[1], context=16),
                             under_out=True)
    parser.add_argument("--shape", default="8B", choices=SHAPES, help="the model's shape (default 8B)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_decode_step.py: no CUDA device visible to torch; this benchmark needs a GPU")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    started = time.perf_counter()
    with torch.device("cuda"):
        model = PersimmonForCausalLM(PersimmonConfig(**shape_sizes(args.shape))).eval()
    torch.set_default_dtype(torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}-shaped model on {torch.cuda.get_device_name()}: {parameters / 1e9:.2f}B "
          f"parameters, made in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for batch in args.batches:
        step, logits = decode_ms(model, batch, args.context)
        costs = {name: sample_ms(logits, settings) for name, settings in SETTINGS.items()}
        rows.append({"batch": batch, "context": args.context, "decode_step_ms": step, "sample_ms": costs})
        print(f"batch {batch}: decode step {step:.2f} ms; sampling " +
              ", ".join(f"{name} {ms:.2f} ms ({ms / step:.0%} of the step)" for name, ms in costs.items()), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
              "model": f"torch reference, eager, fp16, random weights, {args.shape} shape", "rows": rows}
    write_json(args.json, result)


if __name__ == "__main__":
    main()
