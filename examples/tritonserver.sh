#!/usr/bin/env bash
# Serve a model repository with the tritonserver that examples/setup.sh installed in .cache (Triton
# 2.51, bundled in the nvidia-pytriton wheel: CPU, Python backend only) - the way the tests and
# benchmarks start it:
#
#   bash examples/tritonserver.sh demo/repo [more tritonserver options, e.g. --http-port 8010]
#
# It listens on 127.0.0.1 only (HTTP 8000, gRPC 8001, metrics 8002 unless options say otherwise;
# later options win) and stops on Ctrl-C or SIGTERM. The model's Python (the backend stub) imports
# numpy, onnxruntime and sentencepiece from .cache/triton-python and persimmon_runtime from this
# checkout's runtime/ (PERSIMMON_RUNTIME_DIR overrides that). In production, run tritonserver in a
# Triton container instead (docs/triton.md).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash examples/tritonserver.sh MODEL_REPOSITORY [tritonserver options]" >&2
    exit 2
fi
repository=$1; shift
server=$root/.cache/tritonserver/pytriton/tritonserver
backends=$root/.cache/triton-backends
if [ ! -x "$server/bin/tritonserver" ] || [ ! -x "$backends/python/triton_python_backend_stub" ]; then
    echo "examples/tritonserver.sh: error: no tritonserver in $root/.cache: run bash examples/setup.sh (Linux x86_64)" >&2
    exit 2
fi
if [ ! -d "$repository" ]; then
    echo "examples/tritonserver.sh: error: $repository: not a directory; write one with persimmon-export triton" >&2
    exit 2
fi
export LD_LIBRARY_PATH=$root/.cache/tritonserver/nvidia_pytriton.libs
export PYTHONPATH=$root/.cache/triton-python:${PERSIMMON_RUNTIME_DIR:-$root/runtime}
exec "$server/bin/tritonserver" --model-repository "$repository" --backend-directory "$backends" \
    --http-address 127.0.0.1 --grpc-address 127.0.0.1 --metrics-address 127.0.0.1 "$@"
