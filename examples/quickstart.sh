#!/usr/bin/env bash
# Fresh machine -> tiny Persimmon checkpoint + tokenizer -> ONNX build -> streamed generation ->
# parity check. No downloads beyond the package index: the tokenizer is trained here and the
# weights are random (so the text is noise; the numbers are what matter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
bin=.venv/bin
echo "== 1. tiny checkpoint + tokenizer (Hugging Face layout), reference model generation"
$bin/persimmon-export demo --out demo/checkpoint --overwrite
echo "== 2. build: ONNX float16, KV cache of 512 slots, batches up to 4"
$bin/persimmon-export build --checkpoint demo/checkpoint --out demo/build --overwrite --dtype float16 --kv-capacity 512 --max-batch 4
echo "== 3. generate with the onnxruntime runtime (streamed)"
$bin/persimmon-run demo/build "What is the capital of France?" --chat --max-new-tokens 24
echo "== 4. parity of the build against the torch reference"
$bin/persimmon-export parity --checkpoint demo/checkpoint --build demo/build --steps 32
