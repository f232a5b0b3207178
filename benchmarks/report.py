"""Render benchmarks/results/latest.json (from benchmarks/run.py) as the Markdown tables docs show.

    .venv/bin/python benchmarks/report.py [results.json]
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "latest.json")
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"report.py: cannot read {path} ({e}); pass the JSON that benchmarks/run.py wrote")
    if "configs" not in report or "targets" not in report:
        raise SystemExit(f"report.py: {path} is not a benchmarks/run.py result (no 'configs' / 'targets')")
    bandwidth = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in report["bandwidth_bytes_s"].items())
    rows = [row for result in report["configs"].values() for row in result["rows"]]
    pooled = any("steps_timed" in row for row in rows)  # results before f64f3a4: p50/p99 of the median run alone
    print(f"Machine: {report['machine']}. Read bandwidth (GB/s): {bandwidth}. Each run generates "
          f"{report['new_tokens']} greedy tokens, {report.get('repeats', 1)} run(s) per case; prefill = time to the "
          f"first token, decode = the steps after it (tokens/s of the median run; step p50/p99 "
          + ("over every run's steps; machine p99/p50: the same for fixed work of about the step's length, taken "
             "right after).\n" if pooled else "of the median run).\n"))
    headline(report)
    print("\n<details><summary>Every run</summary>\n")
    print("| config | runtime | batch | prompt | prefill tok/s | decode tok/s | step p50 / p99 ms | p99/p50 "
          "| machine p99/p50 | first step / p50 | greedy = transformers | roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, result in report["configs"].items():
        for row in sorted(result["rows"], key=lambda r: (r["batch"], r["prompt"], r["runtime"])):
            agree = f"{row['greedy_agreement']:.0%}" if "greedy_agreement" in row else ""
            roof = f"{row['roofline_fraction']:.0%}" if "roofline_fraction" in row else ""
            jitter = f"{row['machine_jitter']['p99_over_p50']:.2f}" if "machine_jitter" in row else ""
            first = f"{row['first_step_over_p50']:.2f}" if "first_step_over_p50" in row else ""
            print(f"| {name} | {row['runtime']} | {row['batch']} | {row['prompt']} | {row['prefill_tok_s']:.0f} "
                  f"| {row['decode_tok_s']:.1f} | {row['step_p50_ms']:.1f} / {row['step_p99_ms']:.1f} "
                  f"| {row['p99_over_p50']:.2f} | {jitter} | {first} | {agree} | {roof} |")
    print("\n</details>\n\nTargets:")
    for target in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[target["pass"]]
        print(f"- {verdict}: {target['target']} ({target['measured']})")


def headline(report: dict, prompt: int = 1024) -> None:
    """One line per runtime: the figures at a `prompt`-token prompt that the README quotes."""
    configs = list(report["configs"])
    print("| runtime | " + " | ".join(f"{c} prefill / decode tok/s (batch 1)" for c in configs)
          + " | " + " | ".join(f"{c} decode tok/s, batch 8" for c in configs) + " | greedy = transformers |")
    print("|---" * (2 * len(configs) + 2) + "|")
    runtimes = dict.fromkeys(r["runtime"] for c in configs for r in report["configs"][c]["rows"])
    for runtime in runtimes:
        cells, eight, agree = [], [], []
        for c in configs:
            rows = {(r["batch"], r["prompt"]): r for r in report["configs"][c]["rows"] if r["runtime"] == runtime}
            one, many = rows.get((1, prompt)), rows.get((8, prompt))
            cells.append(f"{one['prefill_tok_s']:.0f} / {one['decode_tok_s']:.1f}" if one else "")
            eight.append(f"{many['decode_tok_s']:.1f}" if many else "")
            agree += [r["greedy_agreement"] for r in rows.values() if "greedy_agreement" in r]
        share = f"{sum(agree) / len(agree):.0%}" if agree else ""
        print(f"| {runtime} | " + " | ".join(cells) + " | " + " | ".join(eight) + f" | {share} |")


if __name__ == "__main__":
    main()
