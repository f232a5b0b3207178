"""Backends run one model step over the KV cache; everything else (sampling, streaming,
batching) is shared and lives in `generator`.

A backend has `manifest`, `name`, `start(batch)` (zeroed cache for `batch` sequences) and
`step(input_ids, cache_position, token_count, attention_mask) -> fp32 logits [batch, vocab]`,
with the inputs as described in the manifest (int64 numpy arrays).
"""

from __future__ import annotations

from ..errors import PersimmonError
from ..manifest import Manifest

BACKENDS = ("onnxruntime",)


def load_backend(build_dir: str, manifest: Manifest, backend: str = "auto", device: str = "cpu"):
    if backend == "auto":
        backend = "onnxruntime"
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(build_dir, manifest, device=device)
    if backend == "tensorrt":
        raise PersimmonError("backend 'tensorrt' is not available in this version; use 'onnxruntime'")
    raise PersimmonError(f"backend {backend!r} is unknown; choose 'auto' or one of {BACKENDS}")
