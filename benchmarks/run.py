"""Speed against the tools users would pick instead, measured in one run on this machine.

    bash benchmarks/run.sh                  # = .venv/bin/python benchmarks/run.py (installs matplotlib first)
    bash benchmarks/setup_openvino.sh       # once: the OpenVINO peer's own venv (.venv-openvino)
    .venv/bin/python benchmarks/run.py --configs 100M --quick        # batch 1 only

For Persimmon configs of about 100M and 300M parameters (random weights, CPU), batch 1 and 8,
prompts of 128 and 1024 tokens, every runtime generates --new-tokens greedy tokens and is timed
per token (benchmarks/step_timing.py): prefill = time to the first token, decode = the steps after
it (tokens/s, p50 and p99 step time). The runtimes:
  - this project through its Generator (scheduler, cache allocation, sampling included): fp32, and
    the weight-only int8 / int4 builds (`build --weights`);
  - transformers `generate` (fp32, SDPA attention; it computes logits for the last position only);
  - onnxruntime-genai (where installed) running each of those builds as written, through its own
    search loop (`--genai off` skips it);
  - OpenVINO through optimum-intel (benchmarks/openvino_peer.py, its own venv): fp32 exact, its
    defaults, int8 and int4 weights; its lm_head is sliced to the last position so prefill compares
    the same work. Skipped, with a note, when .venv-openvino is missing.
Greedy tokens of every batch-1 run are compared with transformers fp32 (agreement = the share of
tokens before the first difference). The roofline: read bandwidth measured several ways
(machine.measure_bandwidth, the best of them) over the bytes a decode step must read.
Writes benchmarks/results/latest.json and latest.png; prints PASS/FAIL per target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cli import BenchmarkParser, write_json  # noqa: E402
from machine import CpuShare, cpu_features, cpu_note, fixed_work_jitter, machine, measure_bandwidth  # noqa: E402
from step_timing import median_run, summarize, time_generate  # noqa: E402
from workload import CONFIGS, prompt_texts, random_checkpoint  # noqa: E402

from persimmon_export.build import build  # noqa: E402
from persimmon_export.options import BuildOptions  # noqa: E402
from persimmon_runtime import Tokenizer  # noqa: E402
from persimmon_runtime.generator import Generator  # noqa: E402

OPENVINO_PYTHON = os.path.join(os.path.dirname(HERE), ".venv-openvino", "bin", "python")
# runtime label -> build options (--weights, --kv-cache); the kv-int8 ones are asked for by name
OURS = {"float32": {}, "int8": {"weights": "int8"}, "int4": {"weights": "int4"},
        "float32 kv-int8": {"kv_cache": "int8"}, "int8 kv-int8": {"weights": "int8", "kv_cache": "int8"},
        "int4 kv-int8": {"weights": "int4", "kv_cache": "int8"}}
DEFAULT_PRECISIONS = ["float32", "int8", "int4"]
# how our prompt steps run (Generator.load's prefill): "off" is the build's own graph, "auto" its
# int8 prefill graph where the CPU has AMX-INT8 / VNNI (every build here has one: fp32 with --prefill int8)
PREFILL_SETTINGS = {"off": "", "auto": " +int8 prefill"}  # setting -> runtime label suffix
MAX_BATCH = 8
SMOKE = dict(configs=["30M"], quick=True, repeats=1, new_tokens=4, prompts=[16], precisions=["float32", "int4"],
             openvino=["fp32-exact"], wait_idle=0, bandwidth_gib=1 / 16)


def time_ours(generator: Generator, texts: list[str], new_tokens: int) -> tuple[dict, list[int]]:
    """Per-token figures of one Generator request, from the scheduler's step times."""
    stamps: list[float] = []
    generator.scheduler.on_step = lambda _requests: stamps.append(time.perf_counter())
    started = time.perf_counter()
    completions = generator.generate(texts, max_new_tokens=new_tokens, ignore_eos=True)
    generator.scheduler.on_step = None
    if any(len(c.token_ids) != new_tokens for c in completions):
        raise SystemExit(f"a completion did not have {new_tokens} tokens despite ignore_eos")
    # the last new_tokens steps each gave every row a token; the steps before them were prefill
    figures = summarize(started, stamps[-new_tokens:], len(texts), completions[0].prompt_tokens)
    return figures, completions[0].token_ids


def time_genai(model, ids: list[list[int]], new_tokens: int) -> tuple[dict, list[int]]:
    """onnxruntime-genai's own loop over the same build (its genai_config.json): greedy, EOS held
    off by min_length, a timestamp as each token is ready (the first one includes the prefill)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(ids[0]) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=len(ids))
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(np.array(ids, np.int32))
    stamps, first_row = [], []
    for _ in range(new_tokens):
        generator.generate_next_token()
        first_row.append(int(generator.get_next_tokens()[0]))
        stamps.append(time.perf_counter())
    return summarize(started, stamps, len(ids), len(ids[0])), first_row


def jitter_note(figures: dict) -> str:
    """The machine's own p99/p50 taken next to a measurement (machine.fixed_work_jitter), if it was."""
    jitter = figures.get("machine_jitter")
    return f" (this machine, fixed work of about the step's length: p99/p50 {jitter['p99_over_p50']:.2f})" if jitter else ""


def time_transformers(model, ids: list[list[int]], new_tokens: int) -> tuple[dict, list[int]]:
    figures, new_ids = time_generate(model, ids, new_tokens)
    return figures, new_ids[0]


def agreement(tokens: list[int], reference: list[int]) -> float:
    """The share of tokens generated before the first one that differs from the reference's."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return same / len(reference)


def run_openvino(checkpoint: str, cases: list[dict], new_tokens: int, work: str, int4_group_size: int,
                 variants: list[str], wait_idle_s: float, repeats: int) -> dict:
    if not variants:
        return {}
    if not os.path.exists(OPENVINO_PYTHON):
        print("OpenVINO: .venv-openvino missing (bash benchmarks/setup_openvino.sh): not measured", flush=True)
        return {}
    cases_file = os.path.join(work, "cases.json")
    with open(cases_file, "w") as f:
        json.dump([{"batch": c["batch"], "prompt_tokens": c["prompt"], "ids": c["ids"]} for c in cases], f)
    process = subprocess.run([OPENVINO_PYTHON, os.path.join(HERE, "openvino_peer.py"), "--checkpoint", checkpoint,
                              "--cases", cases_file, "--new-tokens", str(new_tokens),
                              "--int4-group-size", str(int4_group_size), "--wait-idle", str(wait_idle_s),
                              "--repeats", str(repeats),
                              "--variants", *variants],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr.splitlines():
        if line.startswith("openvino "):
            print(line, flush=True)
    if process.returncode != 0:
        raise SystemExit(f"openvino_peer.py failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def run_config(name: str, work: str, batches, lengths, new_tokens: int, wait_idle_s: float, block_size: int,
               precisions: list[str], openvino_variants: list[str], repeats: int, prefills: list[str],
               genai=None) -> dict:
    """`genai`: the onnxruntime_genai module, to time each of our builds through it too (or None)."""
    import transformers

    # positions for the longest prompt and its new tokens (the builds' kv_capacity), 4096 at least
    positions = max(4096, max(lengths) + new_tokens)
    checkpoint, first_added = random_checkpoint(work, name, max_position_embeddings=positions)
    tokenizer_file = os.path.join(checkpoint, "tokenizer.model")
    tokenizer = Tokenizer(tokenizer_file)
    cases = []
    for batch in batches:
        for length in lengths:
            texts = prompt_texts(tokenizer_file, first_added, batch, length, seed=length + batch)
            cases.append({"batch": batch, "prompt": length, "texts": texts,
                          "ids": [tokenizer.encode(t) for t in texts]})
    rows = []

    def record(runtime: str, case: dict, figures: dict, cpu: dict, greedy: list[int]) -> None:
        row = {"config": name, "runtime": runtime, "batch": case["batch"], "prompt": case["prompt"], **figures,
               "cpu": cpu}
        if case["batch"] == 1:
            row["greedy_ids"] = greedy
        rows.append(row)
        print(f"{name:5s} {runtime:22s} batch {case['batch']} prompt {case['prompt']:5d}: prefill "
              f"{figures['prefill_tok_s']:8.1f} tok/s, decode {figures['decode_tok_s']:7.2f} tok/s, step p50 "
              f"{figures['step_p50_ms']:.1f} ms p99 {figures['step_p99_ms']:.1f} ms, first step / p50 "
              f"{figures['first_step_over_p50']:.2f}{jitter_note(figures)} {cpu_note(cpu)}", flush=True)

    hf = transformers.PersimmonForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    # fp32 bytes a decode step reads at batch 1: every weight but the embedding table (one row of
    # it is gathered), and per token of context its keys and values
    params = sum(p.numel() for p in hf.parameters())
    sizes = {"params": params, "weight_bytes_fp32": 4 * (params - hf.model.embed_tokens.weight.numel()),
             "cache_bytes_fp32_per_token": 2 * hf.config.num_hidden_layers * hf.config.hidden_size * 4}
    time_transformers(hf, cases[0]["ids"][:1], 4)  # warm-up
    for case in cases:
        cpu = CpuShare(wait_idle_s=wait_idle_s)
        figures, greedy = median_run(partial(time_transformers, hf, case["ids"], new_tokens), repeats)
        record("transformers", case, figures, cpu.result(), greedy)
    del hf
    for label in precisions:
        options = dict(OURS[label], **({"block_size": block_size} if "weights" in OURS[label] else {}))
        out = os.path.join(work, f"{name}-{label.replace(' ', '-')}")
        build(checkpoint, out, BuildOptions(dtype="float32", backend="onnxruntime", max_batch=MAX_BATCH,
                                            kv_capacity=max(lengths) + new_tokens, prefill="int8", **options))
        for setting in prefills:
            generator = Generator.load(out, prefill=setting)
            kernels = generator.backend.prefill_kernels
            print(f"{name:5s} persimmon {label}{PREFILL_SETTINGS[setting]}: prefill {kernels}", flush=True)
            time_ours(generator, cases[0]["texts"][:1], 4)  # warm-up: onnxruntime's first runs allocate
            for case in cases:
                cpu = CpuShare(wait_idle_s=wait_idle_s)
                figures, greedy = median_run(partial(time_ours, generator, case["texts"], new_tokens), repeats)
                cpu = cpu.result()
                figures["machine_jitter"] = fixed_work_jitter(figures["step_p50_ms"] / 1e3, figures["steps_timed"])
                figures["prefill_kernels"] = kernels
                record(f"persimmon {label}{PREFILL_SETTINGS[setting]}", case, figures, cpu, greedy)
            generator.close()
            del generator
        if genai:  # the same build through onnxruntime-genai (its own search loop, the build's graph)
            model = genai.Model(out)
            time_genai(model, cases[0]["ids"][:1], 4)  # warm-up
            for case in cases:
                cpu = CpuShare(wait_idle_s=wait_idle_s)
                figures, greedy = median_run(partial(time_genai, model, case["ids"], new_tokens), repeats)
                record(f"onnxruntime-genai {label}", case, figures, cpu.result(), greedy)
            del model
    peer = run_openvino(checkpoint, cases, new_tokens, work, block_size, openvino_variants, wait_idle_s, repeats)
    for variant, result in peer.get("variants", {}).items():
        for row in result["rows"]:
            case = next(c for c in cases if c["batch"] == row["batch"] and c["prompt"] == row["prompt"])
            figures = {k: v for k, v in row.items() if k not in ("batch", "prompt", "greedy_ids")}
            rows.append({"config": name, "runtime": f"openvino {variant}", "batch": case["batch"],
                         "prompt": case["prompt"], **figures, **({"greedy_ids": row["greedy_ids"]}
                                                                if "greedy_ids" in row else {})})
    references = {r["prompt"]: r["greedy_ids"] for r in rows if r["runtime"] == "transformers" and "greedy_ids" in r}
    for row in rows:  # greedy agreement with transformers fp32, batch-1 runs
        if "greedy_ids" in row:
            row["greedy_agreement"] = agreement(row.pop("greedy_ids"), references[row["prompt"]])
    return {"rows": rows, "openvino": peer.get("openvino"), **sizes}


def find(rows, runtime, batch, prompt):
    return next((r for r in rows if r["runtime"] == runtime and r["batch"] == batch and r["prompt"] == prompt), None)


def targets(results: dict, context: int) -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when a runtime was not measured, measured) for every target."""
    checks = []

    def ratio(label, config, metric, runtime, peer, batch=1, at_least=1.0):
        mine, theirs = (find(results[config]["rows"], r, batch, context) for r in (runtime, peer))
        if mine is None or theirs is None:
            checks.append((f"{config}: {label}", None, f"not measured ({runtime if mine is None else peer})"))
            return
        value = mine[metric] / theirs[metric]
        checks.append((f"{config}: {label}", value >= at_least, f"{value:.2f}x"))

    for config in results:
        ratio("fp32 decode >= 1.1x OpenVINO exact fp32", config, "decode_tok_s", "persimmon float32",
              "openvino fp32-exact", at_least=1.1)
        ratio("int8 decode >= 1.0x OpenVINO int8", config, "decode_tok_s", "persimmon int8", "openvino int8")
        ratio("int4 decode faster than int8", config, "decode_tok_s", "persimmon int4", "persimmon int8",
              at_least=1.0 + 1e-9)
        ratio("fp32 prefill >= 1.0x transformers", config, "prefill_tok_s", "persimmon float32", "transformers")
        ratio("fp32 prefill >= 1.0x OpenVINO exact fp32", config, "prefill_tok_s", "persimmon float32",
              "openvino fp32-exact")
        ratio("int8 prefill >= 1.0x OpenVINO int8", config, "prefill_tok_s", "persimmon int8", "openvino int8")
        rows = results[config]["rows"]
        for batch in sorted({r["batch"] for r in rows}):  # issue 24: prefill on the CPU's integer units
            for weights in ("int8", "int4"):
                ours = f"{weights}{PREFILL_SETTINGS['auto']}"
                ratio(f"batch {batch}: {ours} prefill >= 1.0x OpenVINO {weights}", config, "prefill_tok_s",
                      f"persimmon {ours}", f"openvino {weights}", batch=batch)
            _best_ratio(checks, config, rows, batch, context, "prefill_tok_s")
            _best_ratio(checks, config, rows, batch, context, "decode_tok_s")
        ratio("fp32 decode not slower than transformers", config, "decode_tok_s", "persimmon float32", "transformers")
        if config == "100M":
            ratio("fp32 decode >= 1.5x transformers", config, "decode_tok_s", "persimmon float32", "transformers",
                  at_least=1.5)
        if config == "300M" and find(results[config]["rows"], "persimmon float32", 1, context):
            fraction = find(results[config]["rows"], "persimmon float32", 1, context)["roofline_fraction"]
            checks.append(("300M: fp32 decode >= 60% of the bandwidth roofline", fraction >= 0.6, f"{fraction:.0%}"))
        for row in results[config]["rows"]:
            if row["runtime"].startswith("persimmon"):
                checks.append((f"{config}: {row['runtime']} batch {row['batch']} prompt {row['prompt']}: decode step "
                               f"p99/p50 <= 1.5", row["p99_over_p50"] <= 1.5,
                               f"{row['p99_over_p50']:.2f}; first step / p50 {row['first_step_over_p50']:.2f}"
                               + jitter_note(row)))
    return checks


def _best_ratio(checks: list, config: str, rows: list[dict], batch: int, context: int, metric: str) -> None:
    """Our fastest runtime's `metric` against OpenVINO's default (bf16 compute where the CPU has it)."""
    ours = [r for r in rows if r["runtime"].startswith("persimmon") and r["batch"] == batch and r["prompt"] == context]
    peer = find(rows, "openvino default", batch, context)
    label = f"{config}: batch {batch}: best {metric.split('_')[0]} >= 1.0x OpenVINO default"
    if not ours or peer is None:
        checks.append((label, None, "not measured"))
        return
    best = max(ours, key=lambda r: r[metric])
    value = best[metric] / peer[metric]
    checks.append((label, value >= 1.0, f"{value:.2f}x ({best['runtime']})"))


def add_roofline(result: dict, bandwidth: float, context: int, new_tokens: int) -> None:
    """Roofline tok/s of fp32 decode at batch 1 and the fraction fp32 runtimes reached."""
    mean_context = context + new_tokens / 2  # the cache grows by one token per step
    bytes_per_token = result["weight_bytes_fp32"] + result["cache_bytes_fp32_per_token"] * mean_context
    result["roofline_decode_tok_s"] = bandwidth / bytes_per_token
    for row in result["rows"]:
        if row["batch"] == 1 and row["prompt"] == context and row["runtime"] in (
                "persimmon float32", "transformers", "openvino fp32-exact"):
            row["roofline_fraction"] = row["decode_tok_s"] / result["roofline_decode_tok_s"]


def chart(results: dict, context: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    configs = list(results)
    runtimes = sorted({r["runtime"] for c in configs for r in results[c]["rows"]})
    width = 0.8 / len(runtimes)
    for ax, metric in zip(axes, ("prefill_tok_s", "decode_tok_s")):
        for i, runtime in enumerate(runtimes):
            values = [(find(results[c]["rows"], runtime, 1, context) or {}).get(metric, 0) for c in configs]
            ax.bar(np.arange(len(configs)) + (i - len(runtimes) / 2) * width, values, width, label=runtime)
        ax.set_xticks(np.arange(len(configs)), configs)
        ax.set_title(f"{metric.replace('_tok_s', '')} tokens/s, batch 1, {context}-token prompt")
        ax.legend(fontsize=7)
    fig.suptitle(f"Persimmon on CPU ({machine()}), random weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = BenchmarkParser(__doc__, "latest.json", SMOKE)
    parser.add_argument("--configs", nargs="+", default=["100M", "300M"], choices=list(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="batch 1 only")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per case; the run with the median decode tokens/s is reported, step p50/p99 over "
                             "the steps of all of them (default 3)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per run (default 128)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 1024],
                        help="prompt lengths in tokens (default 128 1024; the targets read the longest)")
    parser.add_argument("--block-size", type=int, default=32, help="int8/int4 block size, ours and OpenVINO's int4")
    parser.add_argument("--precisions", nargs="*", default=DEFAULT_PRECISIONS, choices=list(OURS),
                        help="this project's builds to measure (default: float32 int8 int4; the kv-int8 ones "
                             "add --kv-cache int8)")
    parser.add_argument("--openvino", nargs="*", default=["fp32-exact", "default", "int8", "int4"],
                        choices=["fp32-exact", "default", "int8", "int4"],
                        help="OpenVINO variants to measure (default: all; none: skip OpenVINO)")
    parser.add_argument("--prefill", nargs="+", default=list(PREFILL_SETTINGS), choices=list(PREFILL_SETTINGS),
                        help="how our builds run prompt steps: off (the build's graph) and/or auto (its int8 prefill "
                             "graph where the CPU has AMX-INT8/VNNI); default both")
    parser.add_argument("--genai", choices=["auto", "off"], default="auto",
                        help="also run each build through onnxruntime-genai (auto: where it is installed)")
    parser.add_argument("--label", default="", help="what this run measures, kept in the JSON (e.g. a commit)")
    parser.add_argument("--wait-idle", type=float, default=60.0,
                        help="seconds to wait before each measurement for other work on the machine to stop")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="the bandwidth probe's matrix (default 1)")
    args = parser.parse_args()
    if args.repeats < 1 or args.new_tokens < 2:
        parser.error("--repeats must be at least 1 and --new-tokens at least 2 (a decode step needs two tokens)")
    torch.set_num_threads(os.cpu_count() or 1)
    batches, lengths = ([1] if args.quick else [1, MAX_BATCH]), sorted(args.prompts)
    new_tokens = args.new_tokens
    bandwidth = measure_bandwidth(args.bandwidth_gib)
    print("memory read bandwidth: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bandwidth.items()), flush=True)
    genai = None
    if args.genai == "auto":
        try:
            import onnxruntime_genai as genai
        except ImportError:
            print("onnxruntime-genai not installed (pip install onnxruntime-genai): not measured", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.configs:
            results[name] = run_config(name, work, batches, lengths, new_tokens, args.wait_idle, args.block_size,
                                       args.precisions, args.openvino, args.repeats, args.prefill, genai)
            add_roofline(results[name], bandwidth["best"], max(lengths), new_tokens)
    report = {"label": args.label, "machine": machine(), "cpu": cpu_features(), "bandwidth_bytes_s": bandwidth,
              "new_tokens": new_tokens,
              "repeats": args.repeats,
              "block_size": args.block_size, "configs": results}
    report["targets"] = [{"target": t, "pass": ok, "measured": m} for t, ok, m in targets(results, max(lengths))]
    write_json(args.json, report)
    try:
        chart(results, max(lengths), os.path.splitext(args.json)[0] + ".png")
    except ImportError:
        print("matplotlib not installed: no chart (bash benchmarks/run.sh installs it)")
    print()
    for item in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "----"}[item["pass"]]
        print(f"{verdict}  {item['target']}: {item['measured']}")


if __name__ == "__main__":
    main()
