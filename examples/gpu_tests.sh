#!/usr/bin/env bash
# Every GPU part, on a machine with an NVIDIA GPU: examples/gpu_check.py (the plugin kernels, the
# true-fp16 emulation against the GPU, the TensorRT backend's CUDA layer, the 8B reference decode
# step, onnxruntime's CUDA provider, NVIDIA TensorRT's plugins and engines), in this checkout's
# .venv. A part that cannot run fails the run instead of passing it silently (and
# PERSIMMON_REQUIRE_GPU=1 makes a skipped `gpu` test a failure).
#
#   bash examples/gpu_tests.sh            # after examples/setup.sh and --install (again after each
#                                         # setup.sh: it reinstalls CPU onnxruntime)
#   bash examples/gpu_tests.sh --install  # first: the gpu and tensorrt extras, NVIDIA TensorRT,
#                                         # onnxruntime-gpu in place of onnxruntime (CUDA 12 wheels,
#                                         # which CUDA 12 and 13 drivers run)
# Other arguments go to gpu_check.py (--dry-run, --skip PART ...). The kernel tests also need nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_tests.sh: no NVIDIA GPU or driver here (nvidia-smi -L failed); run it on a machine with one" >&2
    exit 2
fi
if [ ! -x "$PYTHON" ]; then
    echo "gpu_tests.sh: $PYTHON not found; run examples/setup.sh first" >&2
    exit 2
fi
if [ "${1:-}" = "--install" ]; then
    shift
    "$PYTHON" -m pip install -q -e ".[test,gpu,tensorrt]" tensorrt-cu12
    # One module, two distributions: the install above may have put CPU onnxruntime's files over
    # onnxruntime-gpu's (a second --install, or setup.sh after one). Remove both, then force
    # onnxruntime-gpu's files back: pip would otherwise call it already satisfied.
    "$PYTHON" -m pip uninstall -q -y onnxruntime onnxruntime-gpu || true
    "$PYTHON" -m pip install -q --force-reinstall "onnxruntime-gpu[cuda,cudnn]"
fi
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
exec "$PYTHON" examples/gpu_check.py "$@"
