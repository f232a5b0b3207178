#!/usr/bin/env bash
# The OpenVINO peer's own environment, .venv-openvino: optimum-intel (with OpenVINO and NNCF) and a
# CPU torch. A benchmark dependency only: optimum-intel pins its own transformers and would replace
# the project venv's CPU torch with a CUDA build, so it never goes into .venv. Safe to re-run.
#   bash benchmarks/setup_openvino.sh      # then: .venv/bin/python benchmarks/run.py (finds it)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-openvino/bin/python ] || python3 -m venv .venv-openvino
if ! .venv-openvino/bin/python -c "import optimum.intel.openvino" 2>/dev/null; then
    echo "installing optimum-intel[openvino] and torch ${TORCH_VERSION:-2.13.0} (CPU) into .venv-openvino ..."
    .venv-openvino/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}" "optimum-intel[openvino]>=1.26" "nncf>=2.14"
    # pulled in for vision models only, and built for another torch: transformers' AutoProcessor
    # (which optimum-intel imports) fails on its missing operators while it is installed
    .venv-openvino/bin/pip uninstall -q -y torchvision || true
fi
.venv-openvino/bin/python -c "import openvino, optimum.intel; print('openvino', openvino.__version__)"
