"""Serving benchmarks: the Generator at the real vocabulary, and a real tritonserver and
persimmon-serve under concurrent streaming clients. Results go to benchmarks/results/serving_<label>.json.

    .venv/bin/python benchmarks/serving.py --label after --wait-idle 300   # every part (~8 min idle)
    .venv/bin/python benchmarks/serving.py --smoke      # a quick check that it runs (30M, 8 tokens, 1 and 2 clients)
    .venv/bin/python benchmarks/serving.py --label after --part openai --clients 1 16
    # another commit's runtime (here the one before the change), from a git worktree:
    git worktree add /tmp/before 44ba788
    PYTHONPATH=/tmp/before/runtime:/tmp/before/exporter .venv/bin/python benchmarks/serving.py --label before

The runtime measured is whichever `persimmon_runtime` this process imports (PYTHONPATH first);
the Triton model is pointed at the same directory, and a probe model in the same server reports
which one its stub imported (the run stops if it differs). `--part` selects what to rerun; a
rerun of one part keeps the other part's results in the JSON. On a shared machine,
`--wait-idle SECONDS` waits before each measurement for other work to stop; every measurement
records the cores this benchmark and other work used while it ran.

generator: the 100M config (--config) of benchmarks/run.py (random weights, fp32, onnxruntime CPU, max_batch 8)
  at vocabulary 262,144 (`--generator-vocab`), with a sentencepiece tokenizer of exactly that
  many pieces; generated tokens/s of `Generator.generate` (prefill included), greedy and top-p
  (temperature 0.8, top_p 0.9, seed 1), batch 1 and 8 (8 prompts in one call), 128-token prompts,
  64 new tokens, ignore_eos; the median of `--repeats` runs.
triton: the same config at vocabulary 32,000 (`--vocab`), `max_batch` 8, served by the
  tritonserver in .cache (examples/setup.sh) on 127.0.0.1 from a repository written by
  `persimmon_export.deploy.triton.write_repository`; 1, 4, 16 and 32 concurrent clients, each sending
  ceil(`--min-requests` / clients) streaming HTTP `generate_stream` requests one after another
  (by default 4 at 1 client, 1 from 4 clients up: one request of about a second is too short to
  time alone); 128-token prompts, 64 new tokens, greedy, ignore_eos. Aggregate tokens/s =
  requests x 64 / the round's wall time; p50/p95 of request latency and of time to first token
  (the first streamed piece). Targets (PASS/FAIL): 16-client tokens/s >= 3x the 1-client
  figure; p50 TTFT at 16 clients < 1 s.
openai: the same build and rounds served by `persimmon-serve` (the OpenAI-compatible server) on
  127.0.0.1, each request a streaming /v1/completions (greedy, ignore_eos).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import onnxruntime

import persimmon_runtime
from persimmon_export.build import build
from persimmon_export.deploy.triton import MODEL_PY, write_repository
from persimmon_export.options import BuildOptions  # noqa: E402
from persimmon_runtime.generator import Generator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import tritonserver  # noqa: E402 (tests/tritonserver.py: the bundled server, started as the tests start it)
from cli import BenchmarkParser, results_dir, write_json  # noqa: E402
from machine import CpuShare, cpu_features, cpu_note, group_cpu_s, machine  # noqa: E402
from workload import CONFIGS, prompt_texts, random_checkpoint  # noqa: E402

RUNTIME_DIR = os.path.dirname(os.path.dirname(os.path.abspath(persimmon_runtime.__file__)))
MAX_BATCH = 8
TOP_P = {"temperature": 0.8, "top_p": 0.9, "seed": 1}


# ---- the build: a model of benchmarks/run.py and a tokenizer as large as its vocabulary ----

def make_build(work: str, config: str, vocab: int, kv_capacity: int) -> tuple[str, int]:
    """The `config` of benchmarks/run.py (100M by default) at `vocab`, built for onnxruntime (fp32,
    max_batch 8, with the int8 prefill graph, which --prefill off leaves unused); returns (build
    directory, first added tokenizer piece). Made once per run: the Triton and OpenAI parts serve the same build."""
    if (vocab, kv_capacity) in _BUILDS:
        return _BUILDS[vocab, kv_capacity]
    checkpoint, first_added = random_checkpoint(work, config, vocab)
    out = os.path.join(work, f"build-{vocab}-{kv_capacity}")
    build(checkpoint, out, BuildOptions(dtype="float32", backend="onnxruntime", max_batch=MAX_BATCH,
                                        kv_capacity=kv_capacity, prefill="int8"))
    shutil.rmtree(checkpoint)  # up to 2 GB at the real vocabulary; only the build is needed now
    _BUILDS[vocab, kv_capacity] = out, first_added
    return out, first_added


_BUILDS: dict = {}


# ---- part 1: the Generator in process ----

def time_generate(generator: Generator, prompts: list[str], settings: dict, new_tokens: int, repeats: int) -> dict:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        completions = generator.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True, **settings)
        seconds.append(time.perf_counter() - started)
        if any(len(c.token_ids) != new_tokens for c in completions):
            raise SystemExit(f"a completion did not have {new_tokens} tokens despite ignore_eos")
    median = float(np.median(seconds))
    return {"batch": len(prompts), "seconds": seconds, "tokens_s": len(prompts) * new_tokens / median}


def bench_generator(work: str, config: str, vocab: int, prompt_tokens: int, new_tokens: int, repeats: int,
                    wait_idle_s: float, prefill: str) -> dict:
    started = time.perf_counter()
    build_dir, first_added = make_build(work, config, vocab, kv_capacity=prompt_tokens + new_tokens)
    print(f"generator: built vocab {vocab} in {time.perf_counter() - started:.0f} s", flush=True)
    generator = Generator.load(build_dir, prefill=prefill)
    print(f"generator: prefill {generator.backend.prefill_kernels}", flush=True)
    prompts = prompt_texts(os.path.join(build_dir, "tokenizer.model"), first_added, MAX_BATCH, prompt_tokens,
                           seed=1)
    generator.generate(prompts, max_new_tokens=2)  # warm-up: onnxruntime's first runs allocate
    rows = []
    for name, settings in (("greedy", {}), ("top_p", TOP_P)):
        for batch in (1, MAX_BATCH):
            cpu = CpuShare(wait_idle_s=wait_idle_s)
            row = {"sampling": name, **time_generate(generator, prompts[:batch], settings, new_tokens, repeats),
                   "cpu": cpu.result()}
            rows.append(row)
            print(f"generator {name:6s} batch {batch}: {row['tokens_s']:7.1f} tok/s "
                  f"(runs {', '.join(f'{s:.2f}' for s in row['seconds'])} s) {cpu_note(row['cpu'])}", flush=True)
    generator.close()
    shutil.rmtree(build_dir)  # up to 2 GB at the real vocabulary
    del _BUILDS[vocab, prompt_tokens + new_tokens]  # a later part makes its own
    return {"vocab": vocab, "config": config, "backend": generator.backend.name, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "repeats": repeats, "top_p_settings": TOP_P, "rows": rows}


# ---- part 2: tritonserver ----

PROBE_MODEL = '''
import persimmon_runtime


class TritonPythonModel:  # replaces the generation model: this one only says what it imported
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils
        pb_utils.Logger.log_info("runtime_probe: " + persimmon_runtime.__file__)

    def execute(self, requests):
        return []
'''
PROBE_CONFIG = '''name: "runtime_probe"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
'''


def add_runtime_probe(repository: str) -> None:
    """A model whose model.py sets up sys.path exactly as the generation model's does (the same
    MODEL_PY text), then logs the persimmon_runtime it imported."""
    version_dir = os.path.join(repository, "runtime_probe", "1")
    os.makedirs(version_dir)
    with open(os.path.join(version_dir, "model.py"), "w") as f:
        f.write(MODEL_PY.format(paths=[RUNTIME_DIR], module="persimmon_runtime.triton_model") + PROBE_MODEL)
    with open(os.path.join(repository, "runtime_probe", "config.pbtxt"), "w") as f:
        f.write(PROBE_CONFIG)


def start_server(repository: str, workdir: str) -> dict:
    """tritonserver as tests/test_triton.py starts it (tests/tritonserver.py), metrics off, the stub's
    imports pointed at RUNTIME_DIR; `url` is its HTTP host:port."""
    try:
        server = tritonserver.start(repository, workdir, RUNTIME_DIR, metrics=False, ready_timeout_s=180)
    except tritonserver.Unavailable:
        raise SystemExit("no tritonserver in .cache: run examples/setup.sh (Linux x86_64)") from None
    except RuntimeError as e:
        raise SystemExit(f"tritonserver did not become ready: {e}") from None
    server["url"] = server["http"].removeprefix("http://")
    return server


stop_server = tritonserver.stop


def server_runtime(server: dict) -> str:
    """The persimmon_runtime file the probe model's stub imported (from the server log)."""
    server["log"].flush()
    with open(server["log"].name) as f:
        lines = [line for line in f if "runtime_probe: " in line]
    if not lines:
        raise SystemExit(f"the runtime probe logged nothing; see {server['log'].name}")
    return lines[-1].split("runtime_probe: ", 1)[1].strip().rstrip('"')


# the streaming request of each server: (path, body) for a prompt and a number of new tokens
STREAMS = {
    "triton": lambda prompt, new_tokens: ("/v2/models/persimmon/generate_stream", {
        "text_input": prompt, "max_new_tokens": new_tokens, "ignore_eos": True, "stream": True}),
    "openai": lambda prompt, new_tokens: ("/v1/completions", {
        "model": OPENAI_MODEL, "prompt": prompt, "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0,
        "stream": True}),
}
OPENAI_MODEL = "bench"


def stream_request(url: str, prompt: str, new_tokens: int, api: str = "triton") -> dict:
    """One streaming request (Triton's generate_stream, or OpenAI's /v1/completions with stream true);
    times of its start, first piece and end."""
    path, body = STREAMS[api](prompt, new_tokens)
    started = time.perf_counter()
    connection = http.client.HTTPConnection(url, timeout=900)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        first, pieces = None, 0
        for line in response:  # server-sent events: "data: {...}" (OpenAI's end with "data: [DONE]")
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: "):])
            if "error" in event:
                raise RuntimeError(f"request failed: {event['error']}")
            if api == "openai" and not (event.get("choices") and event["choices"][0]["text"]):
                continue  # the last chunk carries only the finish reason
            first = first or time.perf_counter()
            pieces += 1
        if response.status != 200 or not pieces:
            raise RuntimeError(f"HTTP {response.status} with {pieces} pieces")
    finally:
        connection.close()
    return {"start": started, "first": first, "end": time.perf_counter(), "pieces": pieces}


def client_round(url: str, prompts: list[str], clients: int, per_client: int, new_tokens: int,
                 api: str = "triton") -> dict:
    """`clients` threads start together; each sends `per_client` requests one after another."""
    results, errors = [], []
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        barrier.wait()
        for k in range(per_client):
            try:
                results.append(stream_request(url, prompts[(index * per_client + k) % len(prompts)], new_tokens, api))
            except Exception as e:  # reported below, with the round's numbers
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} of {clients * per_client} requests failed, e.g. {errors[0]}")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    latency = [r["end"] - r["start"] for r in results]
    ttft = [r["first"] - r["start"] for r in results]
    return {"clients": clients, "requests_per_client": per_client, "requests": len(results), "wall_s": wall,
            "tokens_s": len(results) * new_tokens / wall,
            "latency_p50_s": float(np.percentile(latency, 50)), "latency_p95_s": float(np.percentile(latency, 95)),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95)),
            "pieces_per_request": float(np.mean([r["pieces"] for r in results]))}


def bench_triton(work: str, config: str, vocab: int, prompt_tokens: int, new_tokens: int, clients: list[int],
                 min_requests: int, wait_idle_s: float, prefill: str) -> dict:
    started = time.perf_counter()
    build_dir, first_added = make_build(work, config, vocab, kv_capacity=prompt_tokens + new_tokens)
    repository = os.path.join(work, "repository")
    write_repository(build_dir, repository, instances=1, prefill=prefill)
    add_runtime_probe(repository)
    print(f"triton: built vocab {vocab} in {time.perf_counter() - started:.0f} s", flush=True)
    per_client = {count: -(-min_requests // count) for count in clients}
    prompts = prompt_texts(os.path.join(build_dir, "tokenizer.model"), first_added,
                           max(c * n for c, n in per_client.items()), prompt_tokens, seed=2)
    server = start_server(repository, work)
    try:
        imported = server_runtime(server)
        if not imported.startswith(RUNTIME_DIR + os.sep):
            raise SystemExit(f"the server imported {imported}, not the runtime under {RUNTIME_DIR}")
        version = json.load(urllib.request.urlopen(f"http://{server['url']}/v2", timeout=10))["version"]
        stream_request(server["url"], prompts[0], 4)  # warm-up, not counted
        rounds = []
        for count in clients:
            cpu = CpuShare(own_extra=lambda: group_cpu_s(server["process"].pid), wait_idle_s=wait_idle_s)
            r = {**client_round(server["url"], prompts, count, per_client[count], new_tokens), "cpu": cpu.result()}
            rounds.append(r)
            print(f"triton {count:2d} clients, {r['requests']:2d} requests: {r['tokens_s']:6.1f} tok/s, "
                  f"latency p50 {r['latency_p50_s']:.2f} s p95 {r['latency_p95_s']:.2f} s, "
                  f"TTFT p50 {r['ttft_p50_s']:.2f} s p95 {r['ttft_p95_s']:.2f} s {cpu_note(r['cpu'])}", flush=True)
    finally:
        stop_server(server)
    return {"vocab": vocab, "config": config, "max_batch": MAX_BATCH, "instances": 1, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "min_requests": min_requests, "sampling": "greedy, ignore_eos",
            "endpoint": "HTTP generate_stream", "tritonserver": version, "server_imported": imported,
            "rounds": rounds}


def start_openai_server(build_dir: str, prefill: str) -> tuple[subprocess.Popen, str]:
    """persimmon-serve (next to this Python) on a free port of 127.0.0.1, once /health answers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [os.path.join(os.path.dirname(sys.executable), "persimmon-serve"), build_dir, "--port", str(port),
               "--served-model-name", OPENAI_MODEL, "--prefill", prefill, "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([RUNTIME_DIR, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, env=env, start_new_session=True)  # its own group: its CPU is counted
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return process, f"127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"persimmon-serve exited {process.returncode}")
            time.sleep(0.2)
    process.kill()
    raise SystemExit("persimmon-serve did not answer /health in 120 s")


def bench_openai(work: str, config: str, vocab: int, prompt_tokens: int, new_tokens: int, clients: list[int],
                 min_requests: int, wait_idle_s: float, prefill: str) -> dict:
    """The Triton part's build and rounds, served by persimmon-serve (streaming /v1/completions)."""
    build_dir, first_added = make_build(work, config, vocab, kv_capacity=prompt_tokens + new_tokens)
    per_client = {count: -(-min_requests // count) for count in clients}
    prompts = prompt_texts(os.path.join(build_dir, "tokenizer.model"), first_added,
                           max(c * n for c, n in per_client.items()), prompt_tokens, seed=2)
    process, url = start_openai_server(build_dir, prefill)
    try:
        stream_request(url, prompts[0], 4, "openai")  # warm-up, not counted
        rounds = []
        for count in clients:
            cpu = CpuShare(own_extra=lambda: group_cpu_s(process.pid), wait_idle_s=wait_idle_s)
            r = {**client_round(url, prompts, count, per_client[count], new_tokens, "openai"), "cpu": cpu.result()}
            rounds.append(r)
            print(f"openai {count:2d} clients, {r['requests']:2d} requests: {r['tokens_s']:6.1f} tok/s, "
                  f"latency p50 {r['latency_p50_s']:.2f} s p95 {r['latency_p95_s']:.2f} s, "
                  f"TTFT p50 {r['ttft_p50_s']:.2f} s p95 {r['ttft_p95_s']:.2f} s {cpu_note(r['cpu'])}", flush=True)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    return {"vocab": vocab, "config": config, "max_batch": MAX_BATCH, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "min_requests": min_requests, "sampling": "greedy, ignore_eos",
            "endpoint": "persimmon-serve /v1/completions, stream true", "rounds": rounds}


def targets(triton: dict) -> list[dict]:
    by_clients = {r["clients"]: r for r in triton["rounds"]}
    if 1 not in by_clients or 16 not in by_clients:
        return []
    ratio = by_clients[16]["tokens_s"] / by_clients[1]["tokens_s"]
    ttft = by_clients[16]["ttft_p50_s"]
    return [{"target": "aggregate tokens/s at 16 clients >= 3x 1 client", "pass": ratio >= 3,
             "measured": f"{ratio:.2f}x"},
            {"target": "p50 time to first token at 16 clients < 1 s", "pass": ttft < 1, "measured": f"{ttft:.2f} s"}]


# ---- the record ----

def runtime_commit() -> str:
    """The git commit of the measured runtime's checkout, marked when its runtime/ has local changes."""
    def git(*args):
        return subprocess.run(["git", "-C", RUNTIME_DIR, *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    return commit + (" + uncommitted changes in runtime/" if git("status", "--porcelain", "--", ".") else "")


def context() -> dict:
    return {"measured_at": datetime.datetime.now().isoformat(timespec="seconds"), "runtime_dir": RUNTIME_DIR,
            "runtime_commit": runtime_commit(), "load_average_1_5_15_at_start": os.getloadavg()}


def _label(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, _ and - only")
    return text


def main() -> None:
    parser = BenchmarkParser(__doc__, None, dict(label="smoke", config="30M", new_tokens=8, repeats=1, clients=[1, 2],
                                                 min_requests=2, generator_vocab=32000))
    parser.add_argument("--label", type=_label,
                        help="names the results file, benchmarks/results/serving_LABEL.json (e.g. before, after)")
    parser.add_argument("--prefill", default="auto", choices=["auto", "off"],
                        help="the model's prompt steps: auto (the build's int8 prefill graph where the CPU has "
                             "AMX-INT8/VNNI) or off (its fp32 graph)")
    parser.add_argument("--part", default="all", choices=["generator", "triton", "openai", "all"])
    parser.add_argument("--config", default="100M", choices=list(CONFIGS), help="the model (default 100M)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--vocab", type=int, default=32000, help="the Triton build's vocabulary (default 32000)")
    parser.add_argument("--generator-vocab", type=int, default=262144, help="the Generator build's vocabulary")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--min-requests", type=int, default=4, help="requests per round at least (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per Generator setting (median)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                        help="before each measurement, wait up to this long for other work to stop (shared machines)")
    parser.add_argument("--note", default="", help="recorded with the results, e.g. what else ran on the machine")
    args = parser.parse_args()
    if not args.label:
        parser.error("--label is required (it names the results file)")
    path = args.json or os.path.join(results_dir(args.smoke), f"serving_{args.label}.json")
    report = json.load(open(path)) if os.path.isfile(path) else {}  # a rerun of one part keeps the other
    report.update({"label": args.label, "machine": machine(), "cpu": cpu_features(), "prefill": args.prefill,
                   "python": platform.python_version(), "onnxruntime": onnxruntime.__version__})
    print(f"measuring the runtime in {RUNTIME_DIR} ({runtime_commit()})", flush=True)
    shared = dict(config=args.config, prompt_tokens=128, new_tokens=args.new_tokens, wait_idle_s=args.wait_idle,
                  prefill=args.prefill)
    rounds = dict(clients=args.clients, min_requests=args.min_requests)
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as work:
        if args.part in ("generator", "all"):
            report["generator"] = {**context(), "note": args.note,
                                   **bench_generator(work, vocab=args.generator_vocab, repeats=args.repeats, **shared)}
        if args.part in ("triton", "all"):
            report["triton"] = {**context(), "note": args.note,
                                **bench_triton(work, vocab=args.vocab, **shared, **rounds)}
        if args.part in ("openai", "all"):
            report["openai"] = {**context(), "note": args.note,
                                **bench_openai(work, vocab=args.vocab, **shared, **rounds)}
    if "triton" in report:
        report["targets"] = targets(report["triton"])
    write_json(path, report)
    for item in report.get("targets", []):
        print(f"{'PASS' if item['pass'] else 'FAIL'}  {item['target']}: {item['measured']}")


if __name__ == "__main__":
    main()
