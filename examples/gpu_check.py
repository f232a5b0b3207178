"""The GPU check: everything this project has that runs on an NVIDIA GPU, in one run.

    python examples/gpu_check.py                 # every part; a part that cannot run is a failure
    python examples/gpu_check.py --dry-run       # what would run, and what each part lacks here
    python examples/gpu_check.py --skip tensorrt onnxruntime-cuda   # a lent H100/H200: no TensorRT

Made for the GPU machines this project is lent (H100/H200 with torch+CUDA, CuPy, cuda-bindings and
nvcc; no TensorRT, no network; under 5 minutes) and for a full GPU machine after
`bash examples/gpu_tests.sh --install`. Each part lists what it needs; one that lacks something
fails (PERSIMMON_REQUIRE_GPU=1 also makes a skipped `gpu` test a failure) unless --skip names it,
so a run that passes ran everything it claims. Uses the checkout's packages (PYTHONPATH), not an
install. Prints a table; --json writes it too (default $OUT/gpu_check.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = [os.path.join(ROOT, name) for name in ("exporter", "runtime", "plugins")]
TEST_IMPORTS = ("pytest", "numpy", "torch", "onnx", "sentencepiece", "safetensors", "ml_dtypes")  # conftest's


def _modules(*names):
    def probe():
        missing = [name for name in names if importlib.util.find_spec(name) is None]
        return f"no {', '.join(missing)} (pip install it)" if missing else None
    return probe


def _python(code: str):
    """A probe that runs `code` in a fresh interpreter: None when it prints 'ok', else why not."""
    def probe():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(PATHS)}
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        except subprocess.TimeoutExpired:
            return "no answer within 120 s"
        if done.stdout.strip() == "ok":
            return None
        reason = (done.stdout.strip() or done.stderr.strip() or "failed").splitlines()[-1]
        return reason[:200]
    return probe


def _nvidia_smi():
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi (no NVIDIA driver)"
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return None if done.returncode == 0 and "GPU" in done.stdout else "nvidia-smi lists no GPU"


TORCH_CUDA = _python("import torch; print('ok' if torch.cuda.is_available() else 'torch sees no CUDA device')")
CUPY = _python("import cupy; print('ok' if cupy.cuda.runtime.getDeviceCount() else 'no device')")
CUDA_BINDINGS = _python("from persimmon_runtime.backends.cuda import check, cudart\n"
                        "print('ok' if check(cudart().cudaGetDeviceCount()) else 'no device')")
NVCC = _python("from persimmon_plugins.compile import nvcc; print('ok' if nvcc() else 'nvcc not found')")
TENSORRT = _python("import tensorrt as t; print('ok' if hasattr(t, 'Builder') else 'a stub without Builder')")
ORT_CUDA = _python("import onnxruntime as o\nprint('ok' if 'CUDAExecutionProvider' in o.get_available_providers() "
                   "else 'no CUDAExecutionProvider (onnxruntime-gpu)')")


def _pytest(*args):
    return [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", *args]


# (name, what it exercises, [(prerequisite, probe)], command, time limit in s)
PARTS = [
    ("kernels", "the plugins' two CUDA kernels (fp16, fp32) against numpy, compiled by nvcc, run through CuPy",
     [("driver", _nvidia_smi), ("test imports", _modules(*TEST_IMPORTS)), ("CuPy", CUPY), ("nvcc", NVCC)],
     _pytest("-m", "gpu", "tests/test_plugins.py", "-k", "kernel"), 180),
    ("emulation", "parity --emulate's true-fp16 evaluation against real fp16 arithmetic on the GPU (transformers)",
     [("driver", _nvidia_smi), ("test imports", _modules(*TEST_IMPORTS, "transformers")),
      ("torch with CUDA", TORCH_CUDA)],
     _pytest("-m", "gpu", "tests/test_emulate.py"), 240),
    ("cuda-layer", "the TensorRT backend's CUDA layer with real CUDA: device memory, streams, graph capture and "
                   "replay, a capture CUDA invalidates and the fallback, close",
     [("driver", _nvidia_smi), ("test imports", _modules(*TEST_IMPORTS)), ("cuda-python", CUDA_BINDINGS)],
     _pytest("-m", "gpu", "tests/test_tensorrt_backend.py"), 120),
    ("decode-step", "the torch reference's decode step at 8B shape (fp16, batch 1 and 8, 1024 cached tokens): the "
                    "number an engine must beat",
     [("driver", _nvidia_smi), ("torch with CUDA", TORCH_CUDA), ("sentencepiece", _modules("sentencepiece"))],
     [sys.executable, "benchmarks/gpu_decode_step.py", "--batches", "1", "8", "--context", "1024"], 240),
    ("onnxruntime-cuda", "onnxruntime's CUDA provider against its CPU provider on the same builds",
     [("driver", _nvidia_smi), ("test imports", _modules(*TEST_IMPORTS)), ("onnxruntime-gpu", ORT_CUDA)],
     _pytest("-m", "gpu", "tests/test_onnxruntime_cuda.py"), 240),
    ("tensorrt", "NVIDIA TensorRT: the plugins registered and created, engines built and run against torch",
     [("driver", _nvidia_smi), ("test imports", _modules(*TEST_IMPORTS, "transformers")), ("TensorRT", TENSORRT),
      ("cuda-python", CUDA_BINDINGS)],
     _pytest("-m", "gpu", "tests/test_engine.py", "tests/test_plugins.py::test_plugins_register_in_tensorrt"), 600),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="check the prerequisites only; run nothing")
    parser.add_argument("--skip", nargs="+", default=[], choices=[name for name, *_ in PARTS], metavar="PART",
                        help="parts this machine is known not to have (reported as skipped, not run)")
    parser.add_argument("--json", help="write the results here too (default: $OUT/gpu_check.json if $OUT is set)")
    args = parser.parse_args(argv)
    env = {**os.environ, "PERSIMMON_REQUIRE_GPU": "1",
           "PYTHONPATH": os.pathsep.join([*PATHS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    results, started = [], time.perf_counter()
    for name, what, needs, command, limit in PARTS:
        print(f"== {name}: {what}", flush=True)
        if name in args.skip:
            results.append({"part": name, "status": "skipped", "why": "--skip"})
            continue
        lacking = [f"{label}: {why}" for label, probe in needs if (why := probe()) is not None]
        shown = " ".join(command).replace(sys.executable, "python")
        if args.dry_run:
            results.append({"part": name, "status": "would run" if not lacking else "would fail",
                            "command": shown, "why": "; ".join(lacking)})
            continue
        if lacking:
            results.append({"part": name, "status": "failed", "why": "lacks " + "; ".join(lacking)})
            continue
        part_started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, timeout=limit)
            status, why = ("passed", "") if done.returncode == 0 else ("failed", f"exit status {done.returncode}")
        except subprocess.TimeoutExpired:
            status, why = "failed", f"over its {limit} s limit"
        results.append({"part": name, "status": status, "why": why, "command": shown,
                        "seconds": round(time.perf_counter() - part_started, 1)})
    report = {"python": sys.executable, "seconds": round(time.perf_counter() - started, 1), "parts": results}
    print()
    for row in results:
        seconds = f" {row['seconds']:.0f} s" if "seconds" in row else ""
        print(f"{row['part']:17s} {row['status']:10s}{seconds}  {row.get('why', '')}")
        if args.dry_run and "command" in row:
            print(f"{'':17s} {'':10s}  command: {row['command']}")
    target = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if target:
        with open(target, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if any(row["status"] in ("failed", "would fail") for row in results) else 0


if __name__ == "__main__":
    sys.exit(main())
