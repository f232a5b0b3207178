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
