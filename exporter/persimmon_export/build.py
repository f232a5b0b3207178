"""`persimmon-export build`: checkpoint directory -> self-describing build directory.

BUILD_DIR holds the ONNX model (external data), the tokenizer and manifest.json, which is all
the runtime reads. The directory appears complete or not at all.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from persimmon_runtime.manifest import (BUILD_TARGETS, CAUSAL_LM, NO_CACHE, SIZE_LIMITS, Manifest, ModelShape,
                                        TokenizerSection)
from persimmon_runtime.tokenizer import Tokenizer
from persimmon_runtime.verify import sha256_file

from . import __version__
from .attention import onnxruntime_cache_layout
from .checkpoint import check_directory, checked_tensors
from .classify import MODEL_CLASSES, check_task, classifier_section, export_classifier, read_task
from .config import PersimmonConfig
from .engine import FLAVORS, POLYGRAPHY_SCRIPT, TENSORRT, TENSORRT_RTX, build_engine, check_engine_options
from .export import ExportError, export_onnx
from .files import atomic_directory, check_output
from .quantize import prefill_format, prefill_section, weight_format
from .ranges import calibrate, log_summary, report

log = logging.getLogger(__name__)
TOKENIZER_FILE = "tokenizer.model"


def build(checkpoint: str, out_dir: str, dtype: str = "float16", max_batch: int = 8,
          kv_capacity: int | None = None, backend: str = "auto", max_prefill: int | None = None, plugins: str = "auto",
          version_compatible: bool = False, timing_cache: str | None = None, opt_level: int = 3,
          workspace_mib: int | None = None, cache_layout: str | None = None, overwrite: bool = False,
          compute_capabilities: list[str] | None = None, calibration_file: str | None = None,
          weights: str | None = None, block_size: int | None = None, quantize_lm_head: bool | None = None,
          task: str | None = None, prefill: str | None = None) -> Manifest:
    """Export `checkpoint` (an HF directory with tokenizer files) into `out_dir`; return its manifest.

    kv_capacity (cache slots per sequence: prompt + generated tokens; the CLI's --kv-capacity)
    defaults to min(4096, max_position_embeddings). backend
    "tensorrt" (NVIDIA TensorRT) or "tensorrt-rtx" (TensorRT-RTX) also builds an engine; "auto"
    builds a TensorRT engine when NVIDIA TensorRT's builder imports, and never picks TensorRT-RTX
    (its engines run only on the GPUs it targets: that is a choice to make, not a default). The
    other arguments configure the engine (see `engine.build_engine`). bfloat16 builds need an engine
    backend (onnxruntime cannot run them) and have no relu^2 scale. float16 builds first run the
    fp32 reference on calibration prompts (built-in, or calibration_file's lines): the relu^2 scales
    must hold what it measures and the manifest's `ranges` records it (see `ranges`). cache_layout (see
    `export`) defaults to "window" for engine builds, for onnxruntime builds to "capacity" (or "whole"
    where the head size is not a multiple of 8, see `attention`). An existing `out_dir` is
    replaced only if it is a build we wrote and `overwrite` is set (see `files.check_output`).
    weights "int8" / "int4" stores the linear weights as block-wise symmetric integers (block_size
    inputs per scale; quantize_lm_head None: the measured default), see `quantize`.
    prefill "int8" also writes a prefill graph (int8 x int8 linears for steps of many tokens on CPUs
    with integer matrix units; onnxruntime builds only), "none" does not; None: int8 for quantized
    onnxruntime builds, none otherwise (see `quantize.prefill_format`).
    task (default: from config.json's `architectures`) "sequence-classification" or
    "token-classification" builds a classifier graph instead (no cache; kv_capacity is then the
    most tokens per text), see `classify`.
    """
    checkpoint = check_directory(checkpoint)
    config = PersimmonConfig.from_file(checkpoint)
    task = read_task(checkpoint) if task is None else check_task(task)
    classifier = None if task == CAUSAL_LM else classifier_section(checkpoint, config)
    if kv_capacity is None:
        kv_capacity = min(4096, config.max_position_embeddings)
    if backend not in BUILD_TARGETS:
        raise ExportError(f"backend {backend!r} is not available; choose one of {BUILD_TARGETS}")
    if backend == "auto":
        backend = "tensorrt" if TENSORRT.installed()[0] is not None else "onnxruntime"
        if backend == "onnxruntime" and TENSORRT_RTX.installed()[0] is not None:
            log.info("auto: building for onnxruntime; TensorRT-RTX is installed: --backend tensorrt-rtx builds an "
                     "engine for RTX GPUs too")
    flavor = FLAVORS.get(backend)  # None: no engine
    if flavor is None and dtype == "bfloat16":  # onnxruntime 1.32's CPU provider has no bf16 MatMul
        raise ExportError("--dtype bfloat16 builds run only as TensorRT engines (onnxruntime's CPU provider has no "
                          "bfloat16 MatMul): add --backend tensorrt or --backend tensorrt-rtx, or build --dtype "
                          "float16 for onnxruntime")
    if flavor is not None:
        installed, missing = flavor.installed()
        if installed is None:
            raise ExportError(f"--backend {backend}: {missing}")
    if not 1 <= max_batch <= SIZE_LIMITS["max_batch"]:
        raise ExportError(f"--max-batch must be in 1..{SIZE_LIMITS['max_batch']} (rows the runtime allocates "
                          f"caches and logits for), got {max_batch}")
    for field in ("vocab_size", "num_hidden_layers", "num_attention_heads", "head_dim"):  # what the runtime allocates
        if getattr(config, field) > SIZE_LIMITS[field]:
            raise ExportError(f"{checkpoint}/config.json: {field} {getattr(config, field)} is past what a build "
                              f"holds ({SIZE_LIMITS[field]}); is this config.json right?")
    if not 2 <= kv_capacity <= config.max_position_embeddings:
        raise ExportError(f"--kv-capacity must be in [2, max_position_embeddings={config.max_position_embeddings}], "
                          f"got {kv_capacity}")
    max_prefill = max_prefill or min(kv_capacity, 2048)
    cache_layout = cache_layout or (onnxruntime_cache_layout(config.head_dim) if flavor is None else "window")
    if classifier is not None:  # a classifier reads whole texts: no cache, no quantized weights, no range report
        cache_layout = NO_CACHE
        if weights or calibration_file:
            raise ExportError(f"--weights and --calibration-file are for causal-lm builds, not {task}")
    if flavor is not None and cache_layout not in ("window", NO_CACHE):
        raise ExportError(f"{flavor.product} builds need cache_layout 'window' (a static cache length for its "
                          f"KV-cache update)")
    if flavor is not None:  # before the export: what this TensorRT cannot do is refused first
        check_engine_options(flavor, plugins, version_compatible, timing_cache, compute_capabilities, dtype)
    elif compute_capabilities:
        raise ExportError("--compute-capabilities is for --backend tensorrt-rtx")
    if not 1 <= max_prefill <= kv_capacity:
        raise ExportError(f"--max-prefill must be in [1, kv_capacity={kv_capacity}], got {max_prefill}")
    quantized = weight_format(weights, block_size, config, engine=flavor is not None, lm_head=quantize_lm_head)
    why_not = ("has a TensorRT engine" if flavor is not None else f"is a {task}" if classifier is not None else
               None if cache_layout == "capacity" else f"has cache layout {cache_layout!r}")
    prefill_graph = prefill_format(prefill, weights, why_not)
    if calibration_file and dtype != "float16":
        raise ExportError(f"--calibration-file is for --dtype float16 builds (the range report); this build is {dtype}")
    tokenizer = Tokenizer.from_dir(checkpoint)
    inputs = (checkpoint, tokenizer.model_file, timing_cache, calibration_file)
    check_output(out_dir, "build", overwrite=overwrite, inputs=inputs)  # before the slow calibration
    # before the output directory exists: a bad calibration file or an overflow is refused first
    calibrated = dtype == "float16" and classifier is None
    measured = calibrate(checkpoint, config, tokenizer, calibration_file, kv_capacity) if calibrated else None
    started = time.perf_counter()
    with atomic_directory(out_dir, "build", overwrite=overwrite, inputs=inputs) as tmp:
        log.info(f"exporting {checkpoint} -> {out_dir} ({config.num_hidden_layers} layers, {dtype}, "
                 f"kv_capacity {kv_capacity}, max_batch {max_batch})")
        if classifier is None:
            graph, files = export_onnx(config, checked_tensors(checkpoint, config), tmp, dtype=dtype,
                                       kv_capacity=kv_capacity, cache_layout=cache_layout, measured=measured,
                                       weights=quantized, prefill=prefill_graph)
        else:
            graph, files = export_classifier(config, checked_tensors(checkpoint, config, MODEL_CLASSES[task]), tmp,
                                             task, dtype, kv_capacity, classifier.pad_token_id)
        shutil.copyfile(tokenizer.model_file, os.path.join(tmp, TOKENIZER_FILE))
        eos = config.eos_token_id
        manifest = Manifest(
            dtype=dtype, max_batch=max_batch, kv_capacity=kv_capacity,
            model=ModelShape(config.vocab_size, config.num_hidden_layers, config.num_attention_heads,
                             config.head_dim),
            tokenizer=TokenizerSection(TOKENIZER_FILE, tokenizer.add_bos, tokenizer.bos_token, tokenizer.eos_token),
            eos_token_ids=[] if eos is None else list(eos) if isinstance(eos, list) else [eos],
            onnx=graph, files={**files, TOKENIZER_FILE: _file_entry(os.path.join(tmp, TOKENIZER_FILE))},
            exporter_version=__version__, ranges=None if measured is None else report(measured),
            weights=None if quantized is None else quantized.section(), task=task, classifier=classifier,
            prefill=None if prefill_graph is None else prefill_section(prefill_graph))
        if flavor is not None:
            manifest.tensorrt = build_engine(tmp, manifest, max_prefill=max_prefill,
                                             plugins=plugins, version_compatible=version_compatible,
                                             timing_cache=timing_cache, opt_level=opt_level,
                                             workspace_mib=workspace_mib, flavor=flavor,
                                             compute_capabilities=compute_capabilities, shown_as=out_dir)
            written = {manifest.tensorrt.engine_file, manifest.tensorrt.onnx_file, POLYGRAPHY_SCRIPT}
            for name in sorted(written - set(manifest.files)):
                if os.path.exists(os.path.join(tmp, name)):
                    manifest.files[name] = _file_entry(os.path.join(tmp, name))
        manifest.save(tmp)
    log.info(f"built {out_dir} in {time.perf_counter() - started:.1f}s")
    if manifest.ranges is not None:
        log_summary(manifest.ranges)
    return manifest


def summary(manifest: Manifest, out_dir: str) -> dict:
    """What a build is, in a few fields (`build --json`; the line `build` prints comes from it)."""
    engine = manifest.tensorrt
    return {"build": out_dir, "task": manifest.task, "dtype": manifest.dtype,
            "weights": None if manifest.weights is None else manifest.weights.type,
            "prefill": None if manifest.prefill is None else manifest.prefill.weights,
            "kv_capacity": manifest.kv_capacity, "max_batch": manifest.max_batch,
            "vocab_size": manifest.model.vocab_size, "layers": manifest.model.num_hidden_layers,
            "cache_layout": manifest.onnx.cache_layout, "onnx_ir_version": manifest.onnx.ir_version,
            "onnx_opset_imports": manifest.onnx.opset_imports,
            "engine": None if engine is None else {"flavor": engine.flavor, "version": engine.version,
                                                   "file": engine.engine_file,
                                                   "compute_capabilities": engine.compute_capabilities},
            "lowest_fp16_headroom": None if manifest.ranges is None else manifest.ranges.lowest_headroom,
            "bytes": sum(entry["bytes"] for entry in manifest.files.values())}


def summary_line(summary: dict) -> str:
    """'built demo/build: causal-lm float16, kv_capacity 512, max_batch 4, onnxruntime (...), 12.3 MB'."""
    weights = f" with {summary['weights']} weights" if summary["weights"] else ""
    weights += f" (+ {summary['prefill']} prefill graph)" if summary.get("prefill") else ""
    engine = summary["engine"]
    runs_on = "onnxruntime" if engine is None else f"{engine['flavor']} {engine['version']} engine + onnxruntime"
    return (f"built {summary['build']}: {summary['task']} {summary['dtype']}{weights}, kv_capacity "
            f"{summary['kv_capacity']}, max_batch {summary['max_batch']}, {runs_on}, {summary['bytes'] / 1e6:.1f} MB")


def _file_entry(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
