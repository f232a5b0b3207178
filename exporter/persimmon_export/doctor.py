"""`persimmon-export doctor`: what this machine can do - the first thing to run when a build fails."""

from __future__ import annotations

import importlib
import platform
import shutil
import subprocess
import sys
from importlib import metadata

# Each external probe (nvidia-smi, nvcc) gets this long: a wedged driver or toolkit must not hang
# the command people run to find out what is wrong.
PROBE_TIMEOUT_S = 30.0


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gpu() -> str:
    from persimmon_runtime.backends.cuda import check, compute_capability, cudart

    try:
        count = check(cudart().cudaGetDeviceCount())
        if count:
            return f"{count} CUDA device(s) through cuda-python, compute capability {compute_capability(0)}"
    except Exception as e:
        reason = str(e)
    else:
        reason = "cuda-python sees no CUDA device"
    if shutil.which("nvidia-smi"):
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"unknown: nvidia-smi did not answer within {PROBE_TIMEOUT_S:g}s ({reason}); the driver may be hung"
        if query.returncode == 0 and query.stdout.strip():
            return f"{query.stdout.strip()} (nvidia-smi; {reason})"
    return f"none visible ({reason}; no nvidia-smi answer)"


def _tensorrt() -> str:
    from .engine.tensorrt import TENSORRT, dotted_version

    version, why = TENSORRT.installed()
    if version is None:
        return f"unavailable: {why}"
    path = TENSORRT.cache_update_path(version)
    note = "in-place KV-cache-update layer" if path == "tensor_scatter" else \
        f"ScatterElements fallback (in-place update needs >= {dotted_version(TENSORRT.in_place_since)})"
    return f"{dotted_version(version)} ({_support(TENSORRT, version)}; cache update: {note}; engines run on " \
           f"GPUs like the one that builds them)"


def _tensorrt_rtx() -> str:
    from persimmon_runtime.backends.cuda import compute_capability

    from .engine.tensorrt import TENSORRT_RTX, choose_targets, dotted_version

    version, why = TENSORRT_RTX.installed()
    if version is None:
        return f"unavailable: {why}"
    targets = choose_targets(TENSORRT_RTX, importlib.import_module(TENSORRT_RTX.module), None)
    gpu = compute_capability()
    here = "no GPU here" if gpu == "unknown" else \
        f"this GPU ({gpu}) {'is' if gpu in targets else 'is NOT'} one of them"
    return (f"{dotted_version(version)} ({_support(TENSORRT_RTX, version)}; builds engines without a GPU for "
            f"compute capability {', '.join(targets)} (--backend tensorrt-rtx); {here}; running one needs a CUDA "
            f"driver and such a GPU)")


def _support(flavor, version) -> str:
    from .engine.tensorrt import EngineError, dotted_version

    try:
        flavor.check_version(version)
    except EngineError:
        return f"NOT supported: use {dotted_version(flavor.min_version)} - {flavor.max_major}.x"
    return "supported"


def _plugins() -> str:
    from persimmon_plugins import KERNELS
    from persimmon_plugins.compile import PTX_TARGET, CompileError, compile_kernel, nvcc, ptx_requirements

    compiler = nvcc()
    if compiler is None:
        return "nvcc not found: engines build with --plugins off (function bodies as native layers)"
    try:
        ptx = [compile_kernel(op, PTX_TARGET, timeout_s=PROBE_TIMEOUT_S) for op in KERNELS]
        needs = ptx_requirements(ptx)
    except CompileError as e:
        return f"nvcc at {compiler} fails to compile the kernels: {e}"
    driver = needs["min_driver_cuda"]
    runs = f"engines with them need a CUDA {driver}+ driver" if driver else \
        "an ISA this release does not know: --plugins on will refuse it"
    return (f"kernels compile with {compiler} ({', '.join(KERNELS)}: {sum(map(len, ptx))} bytes of {PTX_TARGET} PTX, "
            f"ISA {needs['isa']}; {runs}; NVIDIA TensorRT only, not TensorRT-RTX)")


def _plugin_registration() -> str:
    """Register the plugins as `build --plugins on` does (importing their definitions), then create
    each from the fields the ONNX parser gives: registration failed once (string annotations), and
    creation once (an attribute numpy 2.4 would not convert), both while the kernels compiled fine.
    TensorRT-RTX has no Python plugins, so only NVIDIA TensorRT is tried."""
    from persimmon_plugins import KERNELS
    from persimmon_runtime.custom_ops import CUSTOM_OP_DOMAIN, PLUGIN_VERSION

    from .engine.tensorrt import TENSORRT, dotted_version

    version, why = TENSORRT.installed()
    if version is None:
        return f"not tried: {why}"
    fallback = "builds fall back to the custom ops' function bodies; --plugins on refuses"
    try:
        plugins = importlib.import_module("persimmon_plugins.tensorrt_plugins")  # registers them on import
        for op in KERNELS:
            plugins.create_as_the_parser_does(op)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        return f"FAILED in TensorRT {dotted_version(version)}: {e.__class__.__name__}: {reason}; {fallback}"
    return f"registered and created in TensorRT {dotted_version(version)}: " + \
        ", ".join(f"{CUSTOM_OP_DOMAIN}::{op} v{PLUGIN_VERSION}" for op in KERNELS)


def _onnxruntime() -> str:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return f"unavailable ({e})"
    return f"{ort.__version__}, providers {', '.join(ort.get_available_providers())}"


def report() -> list[tuple[str, str]]:
    """(item, finding) pairs; each probe says why when something is missing."""
    from . import __version__

    return [
        ("persimmon-deploy", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", _version("torch") or "not installed (the exporter needs it: pip install '.[export]')"),
        ("onnx", _version("onnx") or "not installed"),
        ("onnxruntime", _onnxruntime()),
        ("polygraphy", _version("polygraphy") or "not installed (only to rerun a build's recorded `polygraphy convert` line: pip install polygraphy)"),
        ("tensorrt", _tensorrt()),
        ("tensorrt-rtx", _tensorrt_rtx()),
        ("cuda-python", _version("cuda-python") or _version("cuda-bindings") or
         "not installed (the TensorRT runtime backend needs it: pip install cuda-python)"),
        ("gpu", _gpu()),
        ("plugins", _plugins()),
        ("plugin registry", _plugin_registration()),
    ]
