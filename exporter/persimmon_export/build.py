"""`persimmon-export build`: checkpoint directory -> self-describing build directory.

BUILD_DIR holds the ONNX model (external data), the tokenizer and manifest.json, which is all
the runtime reads. The directory appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
import time

from persimmon_runtime.manifest import CUSTOM_OP_DOMAIN, CUSTOM_OP_VERSION, Manifest
from persimmon_runtime.tokenizer import Tokenizer
from persimmon_runtime.verify import sha256_file

from . import __version__
from .checkpoint import check_directory, checked_tensors
from .config import PersimmonConfig
from .engine import build_engine, tensorrt_version
from .export import (DATA_FILE, MODEL_FILE, OPSET, QK_LAYERNORM_OP, RELU2_SCALE, ROTARY_OP, ExportError, export_onnx,
                     io_spec)
from .files import atomic_directory

BACKENDS = ("auto", "onnxruntime", "tensorrt")
TOKENIZER_FILE = "tokenizer.model"


def build(checkpoint: str, out_dir: str, dtype: str = "float16", max_batch: int = 8, max_seq: int | None = None,
          backend: str = "auto", max_prefill: int | None = None, plugins: str = "auto",
          version_compatible: bool = False, timing_cache: str | None = None, opt_level: int = 3,
          workspace_mib: int | None = None, cache_layout: str | None = None, overwrite: bool = False,
          progress=print) -> Manifest:
    """Export `checkpoint` (an HF directory with tokenizer files) into `out_dir`; return its manifest.

    max_seq (the KV cache capacity) defaults to min(4096, max_position_embeddings). backend
    "auto" builds a TensorRT engine too when TensorRT is importable; the other arguments
    configure that engine (see `engine.build_engine`). cache_layout (see `export`) defaults to
    "window" for TensorRT builds and "whole" for onnxruntime builds. An existing `out_dir` is
    replaced only if it is a build we wrote and `overwrite` is set (see `files.check_output`).
    """
    checkpoint = check_directory(checkpoint)
    config = PersimmonConfig.from_file(checkpoint)
    if max_seq is None:
        max_seq = min(4096, config.max_position_embeddings)
    if backend not in BACKENDS:
        raise ExportError(f"backend {backend!r} is not available; choose one of {BACKENDS}")
    if backend in ("auto", "tensorrt"):
        trt_version, trt_missing = tensorrt_version()
        if backend == "tensorrt" and trt_version is None:
            raise ExportError(f"--backend tensorrt: {trt_missing}")
        backend = "tensorrt" if trt_version is not None else "onnxruntime"
    if max_batch < 1:
        raise ExportError(f"--max-batch must be >= 1, got {max_batch}")
    if not 2 <= max_seq <= config.max_position_embeddings:
        raise ExportError(f"--max-seq must be in [2, max_position_embeddings={config.max_position_embeddings}], "
                          f"got {max_seq}")
    max_prefill = max_prefill or min(max_seq, 2048)
    cache_layout = cache_layout or ("window" if backend == "tensorrt" else "whole")
    if backend == "tensorrt" and cache_layout != "window":
        raise ExportError("TensorRT builds need cache_layout 'window' (a static cache length for its KV-cache update)")
    if not 1 <= max_prefill <= max_seq:
        raise ExportError(f"--max-prefill must be in [1, max_seq={max_seq}], got {max_prefill}")
    tokenizer = Tokenizer.from_dir(checkpoint)
    started = time.perf_counter()
    inputs = (checkpoint, tokenizer.model_file, timing_cache)
    with atomic_directory(out_dir, "build", overwrite=overwrite, inputs=inputs) as tmp:
        progress(f"exporting {checkpoint} -> {out_dir} ({config.num_hidden_layers} layers, {dtype}, "
                 f"kv_capacity {max_seq}, max_batch {max_batch})")
        exported = export_onnx(config, checked_tensors(checkpoint, config), tmp, dtype=dtype, kv_capacity=max_seq,
                               cache_layout=cache_layout, progress=progress)
        shutil.copyfile(tokenizer.model_file, os.path.join(tmp, TOKENIZER_FILE))
        inputs, outputs, aliases = io_spec(config, dtype, max_seq, cache_layout)
        eos = config.eos_token_id
        manifest = Manifest(
            dtype=dtype, max_batch=max_batch, kv_capacity=max_seq,
            model={**config.to_dict(), "head_dim": config.head_dim, "rotary_dims": config.rotary_dims},
            tokenizer={"file": TOKENIZER_FILE, "add_bos": tokenizer.add_bos, "bos_token": tokenizer.bos_token,
                       "eos_token": tokenizer.eos_token},
            eos_token_ids=[] if eos is None else list(eos) if isinstance(eos, list) else [eos],
            onnx={"file": MODEL_FILE, "data_file": DATA_FILE, "opset": OPSET, "relu2_scale": RELU2_SCALE[dtype],
                  "cache_layout": cache_layout,
                  "custom_ops": {"domain": CUSTOM_OP_DOMAIN, "version": CUSTOM_OP_VERSION,
                                 "ops": [QK_LAYERNORM_OP, ROTARY_OP] if config.qk_layernorm else [ROTARY_OP]}},
            inputs=inputs, outputs=outputs, cache_aliases=aliases,
            files={**exported["files"], TOKENIZER_FILE: _file_entry(os.path.join(tmp, TOKENIZER_FILE))},
            exporter_version=__version__)
        if backend == "tensorrt":
            manifest.tensorrt = build_engine(tmp, manifest, max_prefill=max_prefill,
                                             plugins=plugins, version_compatible=version_compatible,
                                             timing_cache=timing_cache, opt_level=opt_level,
                                             workspace_mib=workspace_mib, progress=progress)
            for name in {manifest.tensorrt["engine_file"], manifest.tensorrt["onnx_file"]} - set(manifest.files):
                manifest.files[name] = _file_entry(os.path.join(tmp, name))
        manifest.save(tmp)
    progress(f"built {out_dir} in {time.perf_counter() - started:.1f}s")
    return manifest


def _file_entry(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
