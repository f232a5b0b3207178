"""The CPU's integer matrix units, read from /proc/cpuinfo (Linux; no torch, no extra package).

A build's prefill graph (manifest section `prefill`) multiplies with onnxruntime's
DynamicQuantizeMatMul: uint8 activations x int8 weights in MLAS's integer GEMM, which has kernels
for AMX-INT8, AVX512-VNNI and AVX-VNNI. Without one of them MLAS multiplies u8 x s8 with
vpmaddubsw, which adds pairs of products in saturating 16-bit lanes (255 x 127 x 2 > 32767), so
full-range int8 weights can give wrong sums; onnxruntime's session option
`session.x64quantprecision` (kOrtSessionOptionsAvx2PrecisionMode) then rewrites the weights to
uint8 for its exact u8 x u8 kernels (0.44x the speed of u8 x s8 on an AVX512-VNNI CPU,
benchmarks/int8_gemm.py). So the runtime uses the prefill graph where this module finds one of
INT8_UNITS, and where it is told to without one, with that option (`choose_prefill`).
"""

from __future__ import annotations

import logging
import platform

from .errors import PersimmonError

log = logging.getLogger(__name__)
CPUINFO = "/proc/cpuinfo"
# best first: the /proc/cpuinfo flag names of the units MLAS's u8 x s8 GEMM has kernels for
INT8_UNITS = ("amx_int8", "avx512_vnni", "avx_vnni")
# what the matrix/vector units of a CPU are, for benchmark records (bf16 ones: what OpenVINO uses)
RECORDED_FLAGS = ("amx_tile", "amx_int8", "amx_bf16", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                  "avx512f", "avx2", "fma")
PREFILL_CHOICES = ("auto", "int8", "off")


def _first_field(key: str, path: str) -> str | None:
    """The first processor's `key` line of /proc/cpuinfo (None where it or the file is missing)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return next((line.partition(":")[2].strip() for line in f if line.startswith(key)), None)
    except OSError:
        return None


def cpu_flags(path: str = CPUINFO) -> set[str]:
    """The first processor's feature flags (empty where /proc/cpuinfo is missing or unreadable)."""
    return set((_first_field("flags", path) or "").split())


def cpu_model(path: str = CPUINFO) -> str:
    """'AMD EPYC 9R14', or the platform's processor string where /proc/cpuinfo has no model name."""
    return _first_field("model name", path) or platform.processor() or platform.machine()


def int8_unit(flags: set[str]) -> str | None:
    """The best of INT8_UNITS the CPU has, or None."""
    return next((unit for unit in INT8_UNITS if unit in flags), None)


def check_prefill_choice(choice) -> None:
    if choice not in PREFILL_CHOICES:
        raise PersimmonError(f"prefill {choice!r} is not one of {PREFILL_CHOICES}")


def choose_prefill(choice: str, has_graph: bool, device_type: str, flags: set[str] | None = None
                   ) -> tuple[bool, str | None, str]:
    """(run the build's prefill graph?, the INT8_UNITS unit it runs on or None, what runs prompt
    steps and why: the backend's `prefill_kernels`).

    choice "auto": where the build has one, on a CPU with an INT8_UNITS unit; "int8": always (an
    error where the build has none; without such a unit, exact but slower: see the module doc);
    "off": never.
    """
    check_prefill_choice(choice)
    if choice == "off":
        return False, None, "off (as asked)"
    if not has_graph:
        if choice == "int8":
            raise PersimmonError("prefill 'int8': this build has no prefill graph; rebuild it with "
                                 "`persimmon-export build --prefill int8`, or use prefill 'auto'")
        return False, None, "off (this build has no prefill graph)"
    if device_type != "cpu":
        if choice == "int8":
            raise PersimmonError("prefill 'int8' is for CPUs (onnxruntime's DynamicQuantizeMatMul); on a GPU use "
                                 "prefill 'auto' or 'off'")
        return False, None, f"off (the prefill graph is for CPUs, this runs on {device_type})"
    unit = int8_unit(cpu_flags() if flags is None else flags)
    if unit is not None:
        return True, unit, f"int8 DynamicQuantizeMatMul on {unit}"
    if choice == "int8":
        log.warning("prefill int8 on a CPU without AMX-INT8, AVX512-VNNI or AVX-VNNI: exact through onnxruntime's "
                    "u8 x u8 kernels, not measured against the float graph on such a CPU; prefill 'auto' would not "
                    "use it")
        return True, None, "int8 DynamicQuantizeMatMul, u8 x u8 (no VNNI/AMX; forced)"
    return False, None, "off (the CPU has no AMX-INT8, AVX512-VNNI or AVX-VNNI)"
