"""Compile the kernels with nvcc: PTX for TensorRT's ahead-of-time plugins (the driver JIT-compiles
it for the GPU at hand), cubins per architecture for checks."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile

from . import KERNELS

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
ARCHITECTURES = ("sm_80", "sm_90")  # A100, H100/H200
PTX_TARGET = "compute_80"  # runs on sm_80 and newer through the driver's JIT

# PTX ISA version (the `.version` line nvcc writes) -> the first CUDA release whose driver can
# JIT-compile it, from NVIDIA's PTX ISA release history. nvcc has no option to write an older ISA:
# each toolkit writes its own. PTX JIT is outside CUDA's minor-version compatibility, so the
# driver itself must support that release (nvcc 13.0 writes 9.0, which a CUDA 12 driver refuses).
PTX_ISA_MIN_CUDA = {
    "7.0": "11.0", "7.1": "11.1", "7.2": "11.2", "7.3": "11.3", "7.4": "11.4", "7.5": "11.5", "7.6": "11.6",
    "7.7": "11.7", "7.8": "11.8", "8.0": "12.0", "8.1": "12.1", "8.2": "12.2", "8.3": "12.3", "8.4": "12.4",
    "8.5": "12.5", "8.6": "12.7", "8.7": "12.8", "8.8": "12.9", "9.0": "13.0", "9.1": "13.1",
}


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


@functools.cache
def plugin_ptx(op: str) -> bytes:
    """The PTX a plugin embeds in an engine (compiled once per process)."""
    return compile_kernel(op, PTX_TARGET)


def ptx_isa_version(ptx: bytes) -> str:
    """'9.0' from the `.version 9.0` directive that opens nvcc's PTX."""
    found = re.search(rb"^[ \t]*\.version[ \t]+(\d{1,3}\.\d{1,3})[ \t\r]*$", ptx, re.MULTILINE)
    if found is None:
        raise CompileError("nvcc wrote PTX without a `.version` directive; check the CUDA toolkit, or build with "
                           "--plugins off")
    return found.group(1).decode()


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def ptx_requirements(ptx: list[bytes]) -> dict:
    """What a driver needs to run these PTX modules: {"isa": "9.0", "min_driver_cuda": "13.0"};
    min_driver_cuda is None for an ISA newer than PTX_ISA_MIN_CUDA knows."""
    isa = max((ptx_isa_version(code) for code in ptx), key=_version_key)
    return {"isa": isa, "min_driver_cuda": PTX_ISA_MIN_CUDA.get(isa)}


def plugin_ptx_requirements() -> dict:
    """What a driver needs to run the plugins' PTX (see ptx_requirements); an unknown ISA is refused."""
    needs = ptx_requirements([plugin_ptx(op) for op in sorted(KERNELS)])
    if needs["min_driver_cuda"] is None:
        newest = max(PTX_ISA_MIN_CUDA.values(), key=_version_key)
        raise CompileError(f"nvcc wrote PTX ISA {needs['isa']}, whose minimum driver this release does not know; "
                           f"build with an nvcc from CUDA {newest} or older, or with --plugins off")
    return needs
