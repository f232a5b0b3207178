"""Every benchmark script still runs (issue 29): each one's --smoke mode, in a real process (a real
tritonserver and persimmon-serve for serving.py), writes its results with the fields
docs/benchmarks.md reads. --smoke is the script's own code path at its smallest (benchmarks/cli.py)."""

import json
import os
import re
import subprocess
import sys

import pytest
import tritonserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
LIBRARIES = {"cli.py", "machine.py", "step_timing.py", "workload.py"}
SETUP = {"setup_openvino.sh"}  # makes .venv-openvino (network, minutes): not a benchmark
# run.sh runs run.py, which runs openvino_peer.py in .venv-openvino where that exists; report.py reads its JSON
RUN_THROUGH = {"run.py": "run.sh", "openvino_peer.py": "run.sh", "report.py": "run.sh"}


def smoke(tmp_path, script: str, *args: str, timeout: float = 240) -> dict:
    """Run `script --smoke --json FILE ARGS` (bash for .sh) and return the JSON it wrote."""
    out = tmp_path / "result.json"
    command = (["bash", os.path.join(BENCHMARKS, script)] if script.endswith(".sh")
               else [sys.executable, os.path.join(BENCHMARKS, script)])
    done = subprocess.run([*command, "--smoke", "--json", str(out), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)
    assert done.returncode == 0, f"{script} --smoke failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return json.loads(out.read_text())


def has(record: dict, *fields: str) -> None:
    missing = [f for f in fields if f not in record]
    assert not missing, f"missing {missing} in {sorted(record)}"


def test_every_script_has_a_smoke_test():
    scripts = {f for f in os.listdir(BENCHMARKS) if f.endswith((".py", ".sh"))} - LIBRARIES - SETUP
    smoked = set(re.findall(r'smoke\(tmp_path, "([\w.]+)"', open(__file__, encoding="utf-8").read()))
    untested = sorted(s for s in scripts if s not in smoked and RUN_THROUGH.get(s) not in smoked)
    assert not untested, f"benchmark scripts that no test here runs: {untested}"


def test_run_sh_smoke_then_report(tmp_path):
    """run.sh = run.py (our builds, transformers, onnxruntime-genai and OpenVINO where present) + its chart;
    report.py renders the result as the tables docs/benchmarks.md shows."""
    result = smoke(tmp_path, "run.sh")
    has(result, "machine", "cpu", "bandwidth_bytes_s", "configs", "targets")
    rows = result["configs"]["30M"]["rows"]
    for row in rows:
        has(row, "runtime", "batch", "prompt", "prefill_tok_s", "decode_tok_s", "step_p50_ms", "step_p99_ms")
    runtimes = {row["runtime"] for row in rows}
    assert {"transformers", "persimmon float32", "persimmon int4"} <= runtimes, runtimes
    ours = next(row for row in rows if row["runtime"] == "persimmon float32")
    assert ours["greedy_agreement"] == 1.0  # fp32 greedy tokens equal transformers' (4 of them)
    assert (tmp_path / "result.png").stat().st_size > 0
    report = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "report.py"), str(tmp_path / "result.json")],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "| persimmon float32 |" in report.stdout and "Targets:" in report.stdout


def test_report_refuses_other_json(tmp_path):
    """report.py refuses a file that is not run.py's in one line."""
    (tmp_path / "other.json").write_text("{}")
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "report.py"), str(tmp_path / "other.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not a benchmarks/run.py result" in done.stderr


def test_kv_cache_smoke(tmp_path):
    rows = smoke(tmp_path, "kv_cache.py")["rows"]
    assert {row["build"] for row in rows} == {"fp32 weights, fp32 cache", "fp32 weights, int8 cache",
                                               "int4 weights, fp32 cache", "int4 weights, int8 cache"}
    for row in rows:
        has(row, "context", "decode_tok_s", "step_p50_ms", "step_bytes", "bound_tok_s", "bound_fraction",
            "cache_mb_per_sequence_at_capacity")
    assert (tmp_path / "result.png").stat().st_size > 0  # the step-time-vs-bytes plot


def test_attention_smoke(tmp_path):
    rows = smoke(tmp_path, "attention.py")["rows"]
    assert {row["op"] for row in rows} == {"matmul", "int8", "attention", "gqa", "gqa-int8"}
    for row in rows:  # each op against numpy's attention; int8 within its 8-bit codes' error
        has(row, "role", "cache_slots", "median_ms", "p90_ms")
        assert row["max_abs_diff"] < (0.1 if row["op"] == "int8" else 1e-4), row


def test_cache_layouts_smoke(tmp_path):
    rows = smoke(tmp_path, "cache_layouts.py")["rows"]
    assert [row["runtime"] for row in rows] == ["transformers sdpa", "persimmon whole", "persimmon capacity"]
    for row in rows[1:]:
        has(row, "prefill_tok_s", "first_step_ms", "growth_point_steps_ms", "elsewhere_p50_ms")


def test_checkpoint_memory_smoke_leaves_what_it_did_not_write(tmp_path):
    """Writes, loads and (--keep) keeps a checkpoint; loads one it finds and leaves it; refuses, in
    one line, a folder that is not a checkpoint, and leaves its files alone."""
    checkpoint = tmp_path / "checkpoint"
    result = smoke(tmp_path, "checkpoint_memory.py", "--dir", str(checkpoint), "--keep")
    has(result, "load_seconds", "weight_bytes", "peak_rss_bytes", "peak_anon_bytes", "machine")
    assert result["shape"] == "30M"
    before = sorted(os.listdir(checkpoint))
    result = smoke(tmp_path, "checkpoint_memory.py", "--dir", str(checkpoint))
    assert result["shape"].startswith("loaded from") and sorted(os.listdir(checkpoint)) == before
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    command = [sys.executable, os.path.join(BENCHMARKS, "checkpoint_memory.py"), "--smoke", "--dir", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "holds no checkpoint" in done.stderr.strip().splitlines()[-1]
    assert os.listdir(folder) == ["notes.txt"] and (folder / "notes.txt").read_text() == "keep me"


def test_checksum_cost_smoke(tmp_path):
    result = smoke(tmp_path, "checksum_cost.py", "--dir", str(tmp_path))
    has(result, "cold", "warm", "already_verified_ms", "in_memory_sha256_gb_per_s", "extrapolated_8b_seconds")


def test_decode_capacity_smoke(tmp_path):
    result = smoke(tmp_path, "decode_capacity.py")
    has(result, "median_step_seconds", "ratio", "target", "pass", "params")
    assert set(result["median_step_seconds"]) == {"io_binding_capacity_32", "io_binding_capacity_64",
                                                  "session_run_capacity_64"}


def test_export_memory_smoke(tmp_path):
    """Works in a folder of its own under --work and deletes only that."""
    (tmp_path / "notes.txt").write_text("keep me")
    result = smoke(tmp_path, "export_memory.py", "--work", str(tmp_path))
    has(result, "build_seconds", "peak_rss_bytes", "peak_anon_bytes", "onnx_data_bytes", "machine")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "result.json"]


def test_gpu_decode_step_smoke(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("gpu_decode_step.py needs a CUDA GPU")
    rows = smoke(tmp_path, "gpu_decode_step.py")["rows"]
    has(rows[0], "batch", "context", "decode_step_ms", "sample_ms")


def test_int8_gemm_smoke(tmp_path):
    results = smoke(tmp_path, "int8_gemm.py")["results"]
    for row in results:
        has(row, "rows", "op", "ms", "gflop_s")
        # every op's product against numpy's (the full run's 1024 x 4096 products: <= 1.6% at 8 bits, 11% at 4)
        assert row["error"] < (0.2 if "4-bit" in row["op"] else 0.04), row


def test_perplexity_smoke(tmp_path):
    result = smoke(tmp_path, "perplexity.py")
    rows = {(row["runtime"], row["prefill"]): row for row in result["rows"]}
    for row in rows.values():
        has(row, "perplexity", "vs_transformers", "top1_agreement", "max_rel_logit_error")
    exact = rows["persimmon float32", "off (as asked)"]
    assert exact["top1_agreement"] == 1.0 and abs(exact["vs_transformers"]) < 1e-3
    assert {runtime for runtime, _ in rows} == {"transformers float32", "persimmon float32", "persimmon int4 kv-int8"}


def test_prefill_smoke(tmp_path):
    result = smoke(tmp_path, "prefill.py")
    has(result, "prompt_tokens", "prefill_tok_s", "newcomer_chunk_round_s", "peak_rss_long_prompt", "default_chunk")
    assert set(result["peak_rss_long_prompt"]) == {"one_step", "chunked"}


def test_quantized_smoke(tmp_path):
    rows = smoke(tmp_path, "quantized.py")["configs"]["30M"]
    for label in ("fp32", "int4"):
        has(rows[label], "decode_tok_s", "weight_bytes", "max_abs_diff", "top1", "greedy_rows_identical")
    assert rows["int4"]["weight_bytes"] < rows["fp32"]["weight_bytes"] / 2  # the fp32 embedding table stays


def test_range_report_8b_smoke(tmp_path):
    result = smoke(tmp_path, "range_report_8b.py")
    has(result, "lowest_headroom", "lowest_at", "activations", "logits", "relu2_scales")


def test_sampling_smoke(tmp_path):
    results = smoke(tmp_path, "sampling.py")["results"]
    for row in results:
        has(row, "ratio", "pass")
    assert len(results) == 28  # 7 settings x 2 profiles x 1 and 8 rows


def test_serving_smoke(tmp_path):
    """A real tritonserver and persimmon-serve under streaming clients."""
    if not os.path.isfile(tritonserver.SERVER):
        pytest.skip("no tritonserver in .cache (examples/setup.sh fetches it on Linux x86_64)")
    result = smoke(tmp_path, "serving.py", timeout=400)
    has(result, "generator", "triton", "openai", "targets")
    for part in ("triton", "openai"):
        for round_ in result[part]["rounds"]:
            has(round_, "clients", "tokens_s", "ttft_p50_s", "latency_p50_s")
    assert result["triton"]["server_imported"].startswith(os.path.join(ROOT, "runtime"))
