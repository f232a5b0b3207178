#!/usr/bin/env bash
# The benchmark suite in one command (after examples/setup.sh): JSON + PNG in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/pip install -q matplotlib
.venv/bin/python benchmarks/run.py "$@"
