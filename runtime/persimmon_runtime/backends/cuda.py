"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (NVIDIA's bindings).

Every call returns (error, value...) in cuda-python; `check` turns an error into PersimmonError.
"""

from __future__ import annotations

from ..errors import PersimmonError


def cudart():
    """cuda-python's runtime module (cuda.bindings.runtime, or cuda.cudart before 12.6)."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
            return runtime
        except ImportError:
            raise PersimmonError("cuda-python is not installed: pip install cuda-python "
                                 "(the TensorRT backend uses it for device memory and CUDA graphs)") from None


def check(result, what: str = "CUDA call"):
    """Unpack a cuda-python (error, *values) tuple; raise on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise PersimmonError(f"{what} failed: {err}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


def compute_capability(device: int | None = None) -> str:
    """'9.0' for an H100; 'unknown' without a GPU or cuda-python."""
    try:
        rt = cudart()
        device = check(rt.cudaGetDevice()) if device is None else device
        props = check(rt.cudaGetDeviceProperties(device))
        return f"{props.major}.{props.minor}"
    except Exception:
        return "unknown"
