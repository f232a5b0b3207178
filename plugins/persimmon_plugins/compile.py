"""Compile the kernels with nvcc: PTX for TensorRT's ahead-of-time plugins (the driver JIT-compiles
it for the GPU at hand), cubins per architecture for checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from . import KERNELS

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
ARCHITECTURES = ("sm_80", "sm_90")  # A100, H100/H200
PTX_TARGET = "compute_80"  # runs on sm_80 and newer through the driver's JIT


class CompileError(RuntimeError):
    pass


def nvcc() -> str | None:
    """Path of nvcc (PATH, then CUDA_HOME / the usual install), or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


def compile_kernel(op: str, target: str, kind: str = "ptx", timeout_s: float = 300.0) -> bytes:
    """Compile `op`'s kernel source for `target` ("compute_80" for PTX, "sm_90" for a cubin).

    A broken toolkit can make nvcc hang; after `timeout_s` it is killed and CompileError raised.
    """
    compiler = nvcc()
    if compiler is None:
        raise CompileError("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): install the CUDA toolkit to "
                           "build the plugins, or build with --plugins off")
    source = os.path.join(KERNEL_DIR, KERNELS[op][0])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"kernel.{kind}")
        command = [compiler, f"-arch={target}", f"-{kind}", "-O3", "-o", out, source]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise CompileError(f"{compiler} did not finish compiling {source} within {timeout_s:g}s; check the "
                               f"CUDA toolkit, or build with --plugins off") from None
        if result.returncode != 0:
            raise CompileError(f"{source}: nvcc failed for {target}:\n{result.stderr.strip()}")
        with open(out, "rb") as f:
            return f.read()
