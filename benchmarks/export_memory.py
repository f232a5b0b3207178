"""Peak memory and wall time of `persimmon-export build` on a Persimmon-8B-shaped checkpoint.

    .venv/bin/python benchmarks/export_memory.py [--work /tmp] [--layers 36]
    nice -n 10 .venv/bin/python benchmarks/export_memory.py --backend tensorrt-rtx [--layers 36] \
        [--json benchmarks/results/engine_8b.json]
    nice -n 10 .venv/bin/python benchmarks/export_memory.py --weights int4   # a weight-only int4 export

Writes an 8B-shaped bf16 checkpoint with random weights (about 18.8 GB; --layers scales it
down) plus a tiny tokenizer, runs `persimmon-export build --dtype float16` on it in a child
process, and reports the child's wall time, peak RSS and peak anonymous memory (sampled
RssAnon, what the process really holds; RSS also counts memory-mapped checkpoint pages).
Target for the ONNX export: peak RSS < 8 GiB. With --backend tensorrt-rtx the build also
compiles a TensorRT-RTX engine (no GPU needed); the export and the engine phases are then
reported apart (time, and peak memory up to the end of the export), with the engine's size.
Refuses to start unless the disk keeps 10 GB free after everything it will write. Works in a new
folder under --work and deletes it at the end. Prints the result (--json: also writes it there).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from checkpoint_memory import checkpoint_config, parameter_shapes, write_checkpoint
from cli import BenchmarkParser, results_dir, write_json
from machine import cpu_model
from workload import SHAPES

GIB = 2**30
DISK_MARGIN_BYTES = 10e9      # never leave less free than this (others share the disk)


def sample_memory(pid: int, result: dict) -> None:
    """Track VmHWM (peak RSS of the process since exec) and RssAnon of `pid` until it exits.

    ru_maxrss is no use here: Linux carries the parent's high-water mark into a fork+exec child.
    """
    fields = {"VmHWM:": "peak_rss_bytes", "RssAnon:": "peak_anon_bytes"}
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key = fields.get(line.split(":")[0] + ":")
                    if key:
                        result[key] = max(result.get(key, 0), int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.02)


def memory_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def guard_memory(child: subprocess.Popen, floor_bytes: int, result: dict) -> None:
    """Kill the build (and say so) if the machine's available memory falls below `floor_bytes`:
    others share this machine, and an out-of-memory kill could hit their processes instead."""
    while child.poll() is None:
        if memory_available() < floor_bytes:
            result["killed_low_memory_after_seconds"] = round(time.perf_counter() - result["started"], 1)
            child.kill()
            return
        time.sleep(0.2)


def check_disk(work: str, shape: str, layers: int | None, backend: str) -> None:
    """Refuse to start when checkpoint + ONNX (+ an engine up to the ONNX's size) would leave
    less than DISK_MARGIN_BYTES free: a full disk stops everyone on this machine."""
    weights = 2 * sum(math.prod(s) for s in parameter_shapes(checkpoint_config(shape, layers)).values())  # 16-bit
    needed = weights * (3 if backend == "tensorrt-rtx" else 2)
    free = shutil.disk_usage(work).free
    if free - needed < DISK_MARGIN_BYTES:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, this run writes up to {needed / 1e9:.1f} GB and "
                         f"must leave {DISK_MARGIN_BYTES / 1e9:.0f} GB; use --work elsewhere or fewer --layers")


def machine() -> dict:
    """Where the numbers come from: CPU model, cores, RAM, and the TensorRT-RTX version if any."""
    cpu = cpu_model()
    info = {"description": f"{platform.machine()}, {os.cpu_count()} cores, "
                           f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB",
            "cpu": cpu, "cores": os.cpu_count(),
            "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    try:
        import tensorrt_rtx
        info["tensorrt_rtx"] = tensorrt_rtx.__version__
    except ImportError:
        pass
    return info


def run_build(command: list[str], memory_floor_bytes: int) -> dict:
    """Run the build, echoing its output; return wall time, peaks, and the split at the engine phase.

    The engine phase starts at the builder's "TensorRT-RTX <version>: building" progress line.
    """
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    sampled: dict = {}
    sampler = threading.Thread(target=sample_memory, args=(child.pid, sampled), daemon=True)
    sampler.start()
    guarded = {"started": started}
    threading.Thread(target=guard_memory, args=(child, memory_floor_bytes, guarded), daemon=True).start()
    phases: dict = {}
    for line in child.stdout:
        elapsed = time.perf_counter() - started
        print(f"  [{elapsed:7.1f}s] {line.rstrip()}", flush=True)
        if "export_seconds" not in phases and line.startswith("TensorRT-RTX") and ": building" in line:
            phases = {"export_seconds": round(elapsed, 1), "export_peak_rss_bytes": sampled.get("peak_rss_bytes"),
                      "export_peak_anon_bytes": sampled.get("peak_anon_bytes")}
    status = child.wait()
    sampler.join(timeout=1)
    seconds = time.perf_counter() - started
    if "killed_low_memory_after_seconds" in guarded:
        raise SystemExit(f"build stopped after {seconds:.0f}s: the machine had less than "
                         f"{memory_floor_bytes / GIB:.1f} GiB available (peak anonymous memory of the build "
                         f"{sampled.get('peak_anon_bytes', 0) / GIB:.2f} GiB); it does not fit here")
    if status != 0:
        raise SystemExit(f"build failed with status {status} after {seconds:.0f}s")
    result = {"build_seconds": round(seconds, 1), "peak_rss_bytes": sampled.get("peak_rss_bytes"),
              "peak_anon_bytes": sampled.get("peak_anon_bytes"), **phases}
    if phases:
        result["engine_seconds"] = round(seconds - phases["export_seconds"], 1)
    return result


def output_sizes(out: str) -> dict:
    """Sizes of what the build wrote, from its manifest."""
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    sizes = {"onnx_data_bytes": os.path.getsize(os.path.join(out, "model.onnx.data")),
             "onnx_bytes": os.path.getsize(os.path.join(out, "model.onnx"))}
    engine = manifest.get("tensorrt")
    if engine:
        sizes["engine_bytes"] = os.path.getsize(os.path.join(out, engine["engine_file"]))
        sizes["compute_capabilities"] = engine["compute_capabilities"]
    return sizes


def main() -> None:
    parser = BenchmarkParser(__doc__, None, dict(shape="30M", layers=2))
    parser.add_argument("--work", default=tempfile.gettempdir(),
                        help="where to write the checkpoint and the build, in a new folder deleted at the end "
                             "(default: the temp folder)")
    parser.add_argument("--shape", default="8B", choices=SHAPES, help="the checkpoint's shape (default 8B)")
    parser.add_argument("--layers", type=int, help="layers of the checkpoint (default: the shape's own, 36 at 8B)")
    parser.add_argument("--backend", choices=["onnxruntime", "tensorrt-rtx"], default="onnxruntime",
                        help="tensorrt-rtx also builds an engine (default: the ONNX export only)")
    parser.add_argument("--build-arg", action="append", default=[],
                        help="extra `persimmon-export build` argument, repeatable (e.g. --build-arg=--opt-level=0)")
    parser.add_argument("--weights", choices=["int8", "int4"],
                        help="build --weights: linear weights stored as int8/int4 codes (default: fp16)")
    parser.add_argument("--memory-floor-gib", type=float, default=1.0,
                        help="stop the build when the machine has less available memory than this (default 1)")
    args = parser.parse_args()
    if not os.path.isdir(args.work):
        parser.error(f"--work {args.work}: no such folder")
    check_disk(args.work, args.shape, args.layers, args.backend)
    work = tempfile.mkdtemp(dir=args.work, prefix="persimmon-export-bench-")  # ours alone: deleted at the end
    layers = checkpoint_config(args.shape, args.layers).num_hidden_layers
    checkpoint, out = os.path.join(work, "checkpoint"), os.path.join(work, "build")
    try:
        from persimmon_export.demo import train_tokenizer
        from persimmon_export.load.checkpoint import tokenizer_files
        from persimmon_runtime import Tokenizer

        tokenizer = Tokenizer(train_tokenizer(os.path.join(work, "sp.model")))
        print(f"writing {layers}-layer {args.shape}-shaped checkpoint to {checkpoint} ...", flush=True)
        seconds = write_checkpoint(checkpoint, args.layers, extra_files=tokenizer_files(tokenizer), shape=args.shape)
        print(f"  written in {seconds:.0f}s", flush=True)
        exe = os.path.join(os.path.dirname(sys.executable), "persimmon-export")
        command = [exe, "build", "--checkpoint", checkpoint, "--out", out, "--dtype", "float16",
                   "--kv-capacity", "4096", "--max-batch", "8", "--backend", args.backend, *args.build_arg]
        if args.weights:
            command += ["--weights", args.weights]
        print("running:", " ".join(command), flush=True)
        measured = run_build(command, int(args.memory_floor_gib * GIB))
        sizes = output_sizes(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine()
    result = {"shape": args.shape, "layers": layers, "backend": args.backend, "weights": args.weights or "float16",
              "build_args": args.build_arg, **measured, **sizes,
              "machine": info["description"], "machine_details": info}
    print(json.dumps(result, indent=2))
    if args.json or args.smoke:
        write_json(args.json or os.path.join(results_dir(True), "export_memory.json"), result)
    export_peak = result.get("export_peak_rss_bytes", result["peak_rss_bytes"])  # the target is the export's
    verdict = "PASS" if export_peak < 8 * GIB else "FAIL"
    print(f"build of {sizes['onnx_data_bytes'] / GIB:.2f} GiB {args.weights or 'fp16'} weights: {measured['build_seconds']:.0f}s, "
          f"peak RSS {result['peak_rss_bytes'] / GIB:.2f} GiB, peak anonymous {result['peak_anon_bytes'] / GIB:.2f} "
          f"GiB (export: peak RSS {export_peak / GIB:.2f} GiB, target < 8 GiB: {verdict})")
    if "engine_bytes" in sizes:
        print(f"engine {sizes['engine_bytes'] / GIB:.2f} GiB for {', '.join(sizes['compute_capabilities'])}; export "
              f"{measured.get('export_seconds')}s, engine {measured.get('engine_seconds')}s")


if __name__ == "__main__":
    main()
