#!/usr/bin/env bash
# Fresh machine -> tiny Persimmon checkpoint + tokenizer -> streamed generation. No downloads
# beyond the package index: the tokenizer is trained here and the weights are random.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
.venv/bin/persimmon-export demo --out demo/checkpoint "$@"
