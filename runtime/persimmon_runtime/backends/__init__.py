"""Backends run one model step over the KV cache; everything else (sampling, streaming,
batching) is shared and lives in `generator`.

A backend has `manifest`, `name`, `start(batch)` (zeroed cache for `batch` sequences) and
`step(input_ids, cache_position, token_count, attention_mask) -> fp32 logits [batch, vocab]`,
with the inputs as described in the manifest (int64 numpy arrays).
"""

from __future__ import annotations

import re

from ..errors import PersimmonError
from ..manifest import Manifest

BACKENDS = ("onnxruntime", "tensorrt")


def load_backend(build_dir: str, manifest: Manifest, backend: str = "auto", device: str | None = None):
    """`auto` picks TensorRT when the build has an engine and this machine can run it, else onnxruntime.

    device None means the backend's default: "cuda" for TensorRT, "cpu" for onnxruntime.
    """
    if device is not None and not (isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d{1,3})?", device)):
        raise PersimmonError(f"device {device!r} is not 'cpu', 'cuda' or 'cuda:N' (N a GPU index, e.g. cuda:0)")
    if backend == "auto":
        backend = "tensorrt" if manifest.tensorrt and _tensorrt_usable() and device != "cpu" else "onnxruntime"
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(build_dir, manifest, device=device or "cpu")
    if backend == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(build_dir, manifest, device=device or "cuda")
    raise PersimmonError(f"backend {backend!r} is unknown; choose 'auto' or one of {BACKENDS}")


def _tensorrt_usable() -> bool:
    try:
        import tensorrt  # noqa: F401

        from .cuda import check, cudart
        return check(cudart().cudaGetDeviceCount()) > 0
    except Exception:
        return False
