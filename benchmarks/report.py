"""Render benchmarks/results/latest.json as the Markdown table the README shows.

    .venv/bin/python benchmarks/report.py
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    with open(os.path.join(HERE, "results", "latest.json")) as f:
        report = json.load(f)
    print(f"Machine: {report['machine']}; memory read bandwidth {report['bandwidth_bytes_s'] / 1e9:.1f} GB/s.\n")
    print("| config | batch | prompt | prefill tok/s: onnxruntime / torch ref / transformers "
          "| decode tok/s: onnxruntime / torch ref / transformers | onnxruntime decode vs transformers |")
    print("|---|---|---|---|---|---|")
    for name, result in report["configs"].items():
        rows = result["rows"]
        for batch in sorted({r["batch"] for r in rows}):
            for prompt in sorted({r["prompt"] for r in rows}):
                cell = {r["runtime"]: r for r in rows if r["batch"] == batch and r["prompt"] == prompt}
                prefill = " / ".join(f"{cell[k]['prefill_tok_s']:.0f}" for k in ("onnxruntime", "torch-reference",
                                                                                  "transformers"))
                decode = " / ".join(f"{cell[k]['decode_tok_s']:.1f}" for k in ("onnxruntime", "torch-reference",
                                                                                "transformers"))
                ratio = cell["onnxruntime"]["decode_tok_s"] / cell["transformers"]["decode_tok_s"]
                print(f"| {name} ({result['params'] / 1e6:.0f}M) | {batch} | {prompt} | {prefill} | {decode} "
                      f"| {ratio:.2f}x |")
    print("\nDecode roofline (batch 1, longest prompt): weights + KV cache bytes per token / read bandwidth.\n")
    print("| config | roofline tok/s | onnxruntime | torch ref | transformers |")
    print("|---|---|---|---|---|")
    for name, result in report["configs"].items():
        fractions = {r["runtime"]: r["roofline_fraction"] for r in result["rows"] if "roofline_fraction" in r}
        print(f"| {name} | {result['roofline_decode_tok_s']:.1f} | {fractions['onnxruntime']:.0%} "
              f"| {fractions['torch-reference']:.0%} | {fractions['transformers']:.0%} |")
    capacity = report["decode_vs_capacity"]
    steps = ", ".join(f"{k.replace('_capacity_', ' @ ')}: {v * 1e3:.1f} ms" for k, v in
                      capacity["median_step_seconds"].items())
    print(f"\nDecode step vs capacity (134M model, {capacity['context']} tokens of context): {steps}; "
          f"ratio {capacity['ratio']:.2f} (target <= {capacity['target']}).\n")
    print("Targets:")
    for target in report["targets"]:
        print(f"- {'PASS' if target['pass'] else 'FAIL'}: {target['target']} ({target['measured']})")


if __name__ == "__main__":
    main()
