"""`persimmon-export build`: checkpoint directory -> self-describing build directory.

BUILD_DIR holds the ONNX model (external data), the tokenizer and manifest.json, which is all
the runtime reads. The directory appears complete or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

from persimmon_runtime.chat import CHAT_TEMPLATE
from persimmon_runtime.manifest import FileEntry, GraphSection, Manifest, ModelShape, TokenizerSection
from persimmon_runtime.tokenizer import Tokenizer
from persimmon_runtime.verify import sha256_file

from . import __version__
from .config import PersimmonConfig
from .deploy.genai import write_genai_config
from .engine.tensorrt import POLYGRAPHY_SCRIPT, build_engine
from .files import atomic_directory, check_output
from .graph.classify import MODEL_CLASSES, export_classifier
from .graph.export import ExportError, export_onnx
from .graph.quantize import prefill_section
from .graph.ranges import calibrate, log_summary, report
from .load.checkpoint import check_directory, checked_tensors, tokenizer_config
from .options import BuildOptions, BuildPlan

log = logging.getLogger(__name__)
TOKENIZER_FILE = "tokenizer.model"
# what transformers, vLLM and onnxruntime-genai read beside it: the settings and the chat template
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def build(checkpoint: str, out_dir: str, options: BuildOptions = BuildOptions()) -> Manifest:
    """Export `checkpoint` (an HF directory with tokenizer files) into `out_dir` as `options` ask
    (see `options.BuildOptions`); return its manifest.

    The stages: plan (defaults and cross-checks) -> for float16, measure ranges with the fp32
    reference (`graph.ranges`) -> write the graph (`graph.export`, or `graph.classify` for a
    classifier) -> for TensorRT builds, the engine (`engine.tensorrt`) -> the manifest. An existing
    `out_dir` is replaced only if it is a build we wrote and `options.overwrite` is set
    (`files.check_output`); the directory appears complete or not at all.
    """
    checkpoint = check_directory(checkpoint)
    config = PersimmonConfig.from_file(checkpoint)
    plan = options.plan(checkpoint, config)
    options = plan.options
    tokenizer = Tokenizer.from_dir(checkpoint)
    inputs = (checkpoint, tokenizer.model_file, options.engine.timing_cache, options.calibration_file)
    check_output(out_dir, "build", overwrite=options.overwrite, inputs=inputs)  # before the slow calibration
    # before the output directory exists: a bad calibration file or an overflow is refused first
    measured = calibrate(checkpoint, config, tokenizer, options.calibration_file, plan.kv_capacity,
                         fp16=options.dtype == "float16") if plan.calibrated else None
    if options.kv_cache is not None and measured is None:
        raise ExportError(f"--kv-cache {options.kv_cache} takes its scales from the fp32 reference run on the "
                          f"calibration prompts, which this machine has not the memory for (see the warning above); "
                          f"build on a machine with more memory, or leave --kv-cache out")
    started = time.perf_counter()
    with atomic_directory(out_dir, "build", overwrite=options.overwrite, inputs=inputs) as tmp:
        log.info(f"exporting {checkpoint} -> {out_dir} ({config.num_hidden_layers} layers, {options.dtype}, "
                 f"kv_capacity {plan.kv_capacity}, max_batch {options.max_batch})")
        graph, files = _export_graph(plan, config, checkpoint, tmp, measured)
        files.update(_write_tokenizer_files(tokenizer, tmp))
        manifest = _manifest(plan, config, tokenizer, graph, files, measured)
        manifest.files.update(write_genai_config(tmp, manifest, tokenizer))
        if plan.flavor is not None:
            manifest.tensorrt = build_engine(tmp, manifest, plan.flavor, options.engine, shown_as=out_dir)
            written = {manifest.tensorrt.engine_file, manifest.tensorrt.onnx_file, POLYGRAPHY_SCRIPT}
            for name in sorted(written - set(manifest.files)):
                if os.path.exists(os.path.join(tmp, name)):
                    manifest.files[name] = _file_entry(os.path.join(tmp, name))
        manifest.save(tmp)
    log.info(f"built {out_dir} in {time.perf_counter() - started:.1f}s")
    if manifest.ranges is not None:
        log_summary(manifest.ranges)
    return manifest


def _export_graph(plan: BuildPlan, config: PersimmonConfig, checkpoint: str, out_dir: str,
                  measured) -> tuple[GraphSection, dict]:
    """The step graph (or the classifier's graph) and its weights, streamed from the checkpoint."""
    options = plan.options
    if plan.classifier is None:
        return export_onnx(config, checked_tensors(checkpoint, config), out_dir, dtype=options.dtype,
                           kv_capacity=options.kv_capacity, cache_layout=options.cache_layout, measured=measured,
                           weights=plan.weights, prefill=plan.prefill, kv_cache=options.kv_cache)
    return export_classifier(config, checked_tensors(checkpoint, config, MODEL_CLASSES[options.task]), out_dir,
                             options.task, options.dtype, options.max_text_tokens, plan.classifier.pad_token_id)


def _manifest(plan: BuildPlan, config: PersimmonConfig, tokenizer: Tokenizer, graph: GraphSection, files: dict,
              measured) -> Manifest:
    options, eos = plan.options, config.eos_token_id
    return Manifest(
        dtype=options.dtype, max_batch=options.max_batch, kv_capacity=plan.kv_capacity,
        model=ModelShape(config.vocab_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim),
        tokenizer=TokenizerSection(TOKENIZER_FILE, tokenizer.add_bos, tokenizer.bos_token, tokenizer.eos_token,
                                   chat_template=CHAT_TEMPLATE),
        eos_token_ids=[] if eos is None else list(eos) if isinstance(eos, list) else [eos],
        onnx=graph, files=files, exporter_version=__version__,
        ranges=None if measured is None or options.dtype != "float16" else report(measured),
        weights=None if plan.weights is None else plan.weights.section(), task=options.task,
        classifier=plan.classifier, prefill=None if plan.prefill is None else prefill_section(plan.prefill))


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
            "bytes": sum(entry.bytes for entry in manifest.files.values())}


def summary_line(summary: dict) -> str:
    """'built demo/build: causal-lm float16, kv_capacity 512, max_batch 4, onnxruntime (...), 12.3 MB'."""
    weights = f" with {summary['weights']} weights" if summary["weights"] else ""
    weights += f" (+ {summary['prefill']} prefill graph)" if summary.get("prefill") else ""
    engine = summary["engine"]
    runs_on = "onnxruntime" if engine is None else f"{engine['flavor']} {engine['version']} engine + onnxruntime"
    return (f"built {summary['build']}: {summary['task']} {summary['dtype']}{weights}, kv_capacity "
            f"{summary['kv_capacity']}, max_batch {summary['max_batch']}, {runs_on}, {summary['bytes'] / 1e6:.1f} MB")


def _write_tokenizer_files(tokenizer: Tokenizer, out_dir: str) -> dict[str, FileEntry]:
    """The sentencepiece model and tokenizer_config.json (LlamaTokenizer's settings as this build
    tokenizes, and the chat template the manifest carries)."""
    shutil.copyfile(tokenizer.model_file, os.path.join(out_dir, TOKENIZER_FILE))
    settings = {**tokenizer_config(tokenizer), "add_bos_token": tokenizer.add_bos, "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token, "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(out_dir, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
    return {name: _file_entry(os.path.join(out_dir, name)) for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)}


def _file_entry(path: str) -> FileEntry:
    return FileEntry(os.path.getsize(path), sha256_file(path))
