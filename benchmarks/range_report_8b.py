"""The float16 range report of a random Persimmon-8B-shaped model (issue 13), as the README shows it.

    python benchmarks/range_report_8b.py    # needs about 80 GB of RAM (the fp32 model and its init)

What `persimmon-export build --dtype float16` measures before it writes anything (see
exporter/persimmon_export/graph/ranges.py), run on the fp32 reference with the real 8B shape and random
weights (demo.random_model) on the six built-in calibration prompts, tokenized by the small demo
tokenizer (its ids are valid 8B ids; a random model does not care about text). The relu^2 scales
are the exporter's choice from each layer's W2 (export.relu2_scale); the weight part of the report
(max |W| per stored tensor) is left out. Prints the report and writes
benchmarks/results/range_report_8b.json. Random weights say nothing about the real checkpoint's
ranges: this shows what the report looks like and how to read it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(HERE), part) for part in ("exporter", "runtime")]
from cli import BenchmarkParser, write_json  # noqa: E402
from workload import SHAPES, shape_sizes  # noqa: E402

from persimmon_export.config import PersimmonConfig  # noqa: E402
from persimmon_export.demo import random_model, train_tokenizer  # noqa: E402
from persimmon_export.graph.export import relu2_scale  # noqa: E402
from persimmon_export.graph.ranges import BUILTIN_PROMPTS, calibration_ids, measure, report  # noqa: E402
from persimmon_runtime import Tokenizer  # noqa: E402


def main() -> None:
    parser = BenchmarkParser(__doc__, "range_report_8b.json", dict(shape="30M"), under_out=True)
    parser.add_argument("--shape", default="8B", choices=SHAPES, help="the model's shape (default 8B)")
    args = parser.parse_args()
    started = time.perf_counter()
    model = random_model(PersimmonConfig(**shape_sizes(args.shape)), seed=0)
    print(f"random {args.shape}-shaped fp32 model in {time.perf_counter() - started:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Tokenizer(train_tokenizer(os.path.join(tmp, "tokenizer.model")))
    started = time.perf_counter()
    measured = measure(model, calibration_ids(tokenizer, list(BUILTIN_PROMPTS)))
    measured.scales = [relu2_scale(float(layer.mlp.dense_4h_to_h.weight.detach().abs().max()), "float16")
                       for layer in model.model.layers]
    section = report(measured)
    print(f"measured {measured.prompts} prompts, {measured.tokens} tokens in {time.perf_counter() - started:.0f} s")
    print(f"lowest headroom {section.lowest_headroom:.3g}x at {section.lowest_at}; relu^2 scales "
          f"{sorted(set(section.relu2_scales))}")
    for kind, values in section.activations.items():
        worst = max(range(len(values)), key=values.__getitem__)
        print(f"  {kind:20s} max |x| {values[worst]:10.4g} (layer {worst:2d})  headroom {65504 / values[worst]:9.3g}x")
    print(f"  {'logits':20s} max |x| {section.logits:10.4g}              headroom {65504 / section.logits:9.3g}x")
    write_json(args.json, {"shape": args.shape, **dataclasses.asdict(section)})


if __name__ == "__main__":
    main()
