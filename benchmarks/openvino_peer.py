"""The OpenVINO peer: optimum-intel's export of a checkpoint, timed the way benchmarks/run.py times ours.

    .venv-openvino/bin/python benchmarks/openvino_peer.py --checkpoint DIR --cases cases.json \
        --new-tokens 128 [--variants fp32-exact default int8 int4] [--int4-group-size 32]

Runs in its own venv (bash benchmarks/setup_openvino.sh): optimum-intel pins its own transformers.
benchmarks/run.py starts it with a cases file ([{"batch", "prompt_tokens", "ids": [[...], ...]}])
and reads one JSON object from its last output line: per variant, the step_timing figures of
each case and the greedy ids of batch-1 cases (run.py checks them against transformers).

Variants, all from the same transformers checkpoint:
- fp32-exact: fp32 weights, INFERENCE_PRECISION_HINT f32 (exact fp32 compute);
- default: fp32 weights, OpenVINO's default precision (bf16 compute on CPUs with AVX-512 bf16/AMX);
- int8 / int4: NNCF weight-only compression (symmetric; int4 per group of --int4-group-size,
  every layer, ratio 1.0), OpenVINO's default compute precision.

Like for like: optimum-intel's model returns logits for every prompt position (an lm_head over
the whole prompt), ours and transformers' generate() only the last position's. The lm_head's input
is sliced to the last position here before compiling (`slice_lm_head`), so prefill times compare
the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import numpy as np
import openvino.opset13 as ops
from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import CpuShare, cpu_note  # noqa: E402
from step_timing import median_run, time_generate  # noqa: E402

VARIANTS = ("fp32-exact", "default", "int8", "int4")


def load(checkpoint: str, variant: str, int4_group_size: int) -> OVModelForCausalLM:
    settings = {"fp32-exact": dict(load_in_8bit=False, ov_config={"INFERENCE_PRECISION_HINT": "f32"}),
                "default": dict(load_in_8bit=False),
                "int8": dict(quantization_config=OVWeightQuantizationConfig(bits=8, sym=True)),
                "int4": dict(quantization_config=OVWeightQuantizationConfig(
                    bits=4, sym=True, group_size=int4_group_size, ratio=1.0))}[variant]
    model = OVModelForCausalLM.from_pretrained(checkpoint, export=True, compile=False, **settings)
    slice_lm_head(model.model)
    model.compile()
    return model


def slice_lm_head(model) -> None:
    """Make the lm_head MatMul read only the last position of its [batch, seq, hidden] input."""
    node = model.output("logits").get_node()
    while node.get_type_name() != "MatMul":
        if node.get_input_size() == 0:
            raise SystemExit("no MatMul above the logits output: cannot slice the lm_head")
        node = node.input_value(0).get_node()
    hidden = node.input_value(0)
    last = ops.slice(hidden, np.array([-1], np.int64), np.array([np.iinfo(np.int64).max], np.int64),
                     np.array([1], np.int64), np.array([1], np.int64))
    node.input(0).replace_source_output(last.output(0))
    model.validate_nodes_and_infer_types()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--cases", required=True, help="JSON file of cases (see above)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--int4-group-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="runs per case; the median decode run is kept")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="seconds to wait for an idle machine per case")
    args = parser.parse_args()
    with open(args.cases) as f:
        cases = json.load(f)
    import openvino

    report = {"openvino": openvino.__version__, "variants": {}}
    for variant in args.variants:
        started = time.perf_counter()
        model = load(args.checkpoint, variant, args.int4_group_size)
        export_s = time.perf_counter() - started
        time_generate(model, cases[0]["ids"][:1], 4)  # warm-up: first inferences compile kernels
        rows = []
        for case in cases:
            cpu = CpuShare(wait_idle_s=args.wait_idle)
            figures, greedy = median_run(partial(time_generate, model, case["ids"], args.new_tokens), args.repeats)
            figures["cpu"] = cpu.result()
            rows.append({"batch": case["batch"], "prompt": case["prompt_tokens"], **figures,
                         **({"greedy_ids": greedy[0]} if case["batch"] == 1 else {})})
            print(f"openvino {variant:10s} batch {case['batch']} prompt {case['prompt_tokens']:5d}: prefill "
                  f"{figures['prefill_tok_s']:8.1f} tok/s, decode {figures['decode_tok_s']:7.2f} tok/s, step p50 "
                  f"{figures['step_p50_ms']:.1f} ms p99 {figures['step_p99_ms']:.1f} ms {cpu_note(figures['cpu'])}",
                  file=sys.stderr, flush=True)
        report["variants"][variant] = {"export_s": export_s, "rows": rows}
        del model
    print(json.dumps(report))


if __name__ == "__main__":
    main()
