#!/usr/bin/env bash
# Every GPU test, on a machine with an NVIDIA GPU: the tests marked `gpu` (CUDA kernels against
# numpy through CuPy, the plugins registering in NVIDIA TensorRT, CUDA graphs through cuda-python,
# onnxruntime's CUDA provider against its CPU provider, TensorRT engine parity with torch and
# onnxruntime). PERSIMMON_REQUIRE_GPU=1 makes a skipped GPU test a failure: a missing driver,
# package or toolkit fails the run instead of passing it silently.
#
#   bash examples/gpu_tests.sh            # after examples/setup.sh and --install once
#   bash examples/gpu_tests.sh --install  # first: the gpu and tensorrt extras, NVIDIA TensorRT,
#                                         # onnxruntime-gpu in place of onnxruntime (CUDA 12 wheels,
#                                         # which CUDA 12 and 13 drivers run)
# Other arguments go to pytest (-x, -k kernel, ...). The kernel tests also need nvcc (CUDA toolkit).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_tests.sh: no NVIDIA GPU or driver here (nvidia-smi -L failed); run it on a machine with one" >&2
    exit 2
fi
if [ "${1:-}" = "--install" ]; then
    shift
    "$PYTHON" -m pip install -q -e ".[test,gpu,tensorrt]" tensorrt-cu12
    # one module, two distributions: onnxruntime-gpu must replace onnxruntime, not sit beside it
    "$PYTHON" -m pip uninstall -q -y onnxruntime
    "$PYTHON" -m pip install -q "onnxruntime-gpu[cuda,cudnn]"
fi
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
PERSIMMON_REQUIRE_GPU=1 exec "$PYTHON" -m pytest -m gpu -rfs -q tests "$@"
