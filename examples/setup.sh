#!/usr/bin/env bash
# Create .venv with both packages (editable), the test tools and a CPU build of torch.
# Safe to re-run. TORCH_VERSION picks another torch (default 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "installing torch ${TORCH_VERSION:-2.13.0} ..."
    .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
echo "installing persimmon-deploy[test] ..."
.venv/bin/pip install -q -e ".[test]"

# TensorRT-RTX builds real engines without a GPU (CPU-only AOT), so the tests build and inspect
# engines everywhere this runs. Its wheels are for Linux x86_64 and Windows only.
if [ "$(uname -sm)" = "Linux x86_64" ] && ! .venv/bin/python -c "import tensorrt_rtx" 2>/dev/null; then
    echo "installing tensorrt-rtx-cu12 (TensorRT-RTX, ~215 MB) ..."
    .venv/bin/pip install -q "tensorrt-rtx-cu12>=1.7,<2"
fi

# A real tritonserver for the Triton tests and demo: nvidia-pytriton's wheel bundles the binary
# (with its libraries and the Python backend; CPU is enough), unpacked - not installed, since
# pytriton pins numpy<2. The backend's stub embeds the system libpython, so the model's imports
# get their own numpy<2 environment in .cache/triton-python.
if [ "$(uname -sm)" = "Linux x86_64" ] && [ ! -x .cache/tritonserver/pytriton/tritonserver/bin/tritonserver ]; then
    echo "fetching tritonserver (nvidia-pytriton wheel) into .cache/tritonserver ..."
    rm -rf .cache/tritonserver .cache/triton-wheel
    .venv/bin/pip download -q --no-deps "nvidia-pytriton==0.7.0" -d .cache/triton-wheel
    .venv/bin/python -m zipfile -e .cache/triton-wheel/nvidia_pytriton-*.whl .cache/tritonserver
    chmod +x .cache/tritonserver/pytriton/tritonserver/bin/tritonserver \
        .cache/tritonserver/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
    rm -rf .cache/triton-wheel
fi
# The backend directory examples/tritonserver.sh serves with: the python backend and the stub of
# the Python that .cache/triton-python is installed for (the stub embeds that libpython).
stub_python=$(.venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "$(uname -sm)" = "Linux x86_64" ] && [ ! -x .cache/triton-backends/python/triton_python_backend_stub ]; then
    rm -rf .cache/triton-backends
    mkdir -p .cache/triton-backends
    cp -r .cache/tritonserver/pytriton/tritonserver/backends/python .cache/triton-backends/python
    cp .cache/tritonserver/pytriton/tritonserver/python_backend_stubs/"$stub_python"/triton_python_backend_stub \
        .cache/triton-backends/python/
fi
if [ "$(uname -sm)" = "Linux x86_64" ] && [ ! -d .cache/triton-python/jinja2 ]; then
    echo "installing the Triton model's Python dependencies into .cache/triton-python ..."
    .venv/bin/pip install -q --target .cache/triton-python "numpy<2" onnxruntime sentencepiece "jinja2>=3.1"
fi

# Two small runtime-only venvs for tests/test_compat.py: builds must load and generate the same
# tokens on the runtime's declared floors (pyproject.toml's minimums of onnxruntime, numpy,
# sentencepiece and jinja2, and of the serve extra's starlette and uvicorn, read from it here) and on the newest onnxruntime-gpu's version number (its CPU wheel:
# onnxruntime-gpu and the onnxruntime in Triton containers lag the CPU package). Remade when the
# versions change.
ORT_GPU_NEWEST=1.31.1  # the newest onnxruntime-gpu release on PyPI (2026-12); move it when that does
floor() { sed -n "s/^ *\"$1>=\([0-9.]*\)\".*/\1/p" pyproject.toml; }
runtime_venv() {
    local dir=$1; shift
    if [ "$(cat "$dir/requirements.txt" 2>/dev/null)" != "$*" ]; then
        echo "making $dir ($*) ..."
        rm -rf "$dir"
        python3 -m venv "$dir"
        "$dir/bin/pip" install -q "$@"
        echo "$*" > "$dir/requirements.txt"
    fi
}
runtime_venv .cache/venv-floors "onnxruntime==$(floor onnxruntime)" "numpy==$(floor numpy)" \
    "sentencepiece==$(floor sentencepiece)" "jinja2==$(floor jinja2)" "starlette==$(floor starlette)" \
    "uvicorn==$(floor uvicorn)"
runtime_venv .cache/venv-ort-gpu-newest "onnxruntime==$ORT_GPU_NEWEST" numpy sentencepiece
