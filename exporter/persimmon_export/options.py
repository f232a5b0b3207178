"""What a build is asked to be: `BuildOptions` (with `engine.tensorrt.EngineOptions` inside), and the `BuildPlan`
they resolve to against one checkpoint - every default and every cross-check in one place.

`persimmon-export build` fills BuildOptions from its arguments; `build.build` takes them and
runs the plan. Checks that need nothing but the options run when they are made; those that need
the checkpoint's config or the installed TensorRT run in `BuildOptions.plan`, before anything is
written.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from persimmon_runtime.manifest import (
    BUILD_BACKENDS,
    CAUSAL_LM,
    DTYPES,
    KV_CACHE_INT8,
    NO_CACHE,
    SIZE_LIMITS,
    ClassifierSection,
)

from .config import PersimmonConfig
from .engine.tensorrt import FLAVORS, TENSORRT, TENSORRT_RTX, EngineOptions, Flavor, check_engine_options
from .graph.attention import onnxruntime_cache_layout
from .graph.classify import check_task, classifier_section, read_task
from .graph.export import ExportError
from .graph.quantize import WeightFormat, prefill_format, weight_format

log = logging.getLogger(__name__)
DEFAULT_KV_CAPACITY = 4096  # or the model's max_position_embeddings if smaller


@dataclass(frozen=True)
class BuildOptions:
    """Everything `persimmon-export build` can be asked; None means "the default for this checkpoint"."""
    dtype: str = "float16"                  # DTYPES: weights, activations and cache
    task: str | None = None                 # TASKS; None: from config.json's architectures
    max_batch: int = 8                      # rows the runtime allocates caches and logits for
    kv_capacity: int | None = None          # causal-lm: cache slots per sequence; None: min(max positions, 4096)
    max_text_tokens: int | None = None      # classifiers (no cache): most tokens per text; None: as kv_capacity
    backend: str = "auto"                   # BUILD_BACKENDS: what runs the build (an engine for tensorrt*)
    cache_layout: str | None = None         # manifest.CACHE_LAYOUTS; None: the backend's own
    weights: str | None = None              # "int8" / "int4": weight-only quantized linears (graph.quantize)
    block_size: int | None = None           # inputs per scale of quantized weights; None: 32
    quantize_lm_head: bool | None = None    # None: the measured default per weight type
    prefill: str | None = None              # "int8" / "none": the int8 prefill graph; None: int8 with --weights
    kv_cache: str | None = None             # "int8": the KV cache as int8, calibrated per channel; None: in dtype
    calibration_file: str | None = None     # float16: prompts for the range report
    overwrite: bool = False                 # replace an earlier build of ours at the output
    engine: EngineOptions = field(default_factory=EngineOptions)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype {self.dtype!r} is not one of {DTYPES}")
        if self.backend not in BUILD_BACKENDS:
            raise ExportError(f"--backend {self.backend!r} is not available; choose one of {BUILD_BACKENDS}")
        if not 1 <= self.max_batch <= SIZE_LIMITS["max_batch"]:
            raise ExportError(f"--max-batch must be in 1..{SIZE_LIMITS['max_batch']} (rows the runtime allocates "
                              f"caches and logits for), got {self.max_batch}")
        if self.task is not None:
            check_task(self.task)
        if self.kv_capacity is not None and self.max_text_tokens is not None:
            raise ExportError("--kv-capacity is a causal LM's cache slots, --max-text-tokens a classifier's most "
                              "tokens per text: give the one for this build's task")

    def plan(self, checkpoint: str, config: PersimmonConfig) -> BuildPlan:
        """These options for `checkpoint`: every default filled in, every combination checked."""
        task = read_task(checkpoint) if self.task is None else self.task
        classifier = None if task == CAUSAL_LM else classifier_section(checkpoint, config)
        limit = self.kv_capacity if classifier is None else self.max_text_tokens
        flag = "--kv-capacity" if classifier is None else "--max-text-tokens"
        if classifier is None and self.max_text_tokens is not None:
            raise ExportError("--max-text-tokens is for classifier builds (--task sequence-/token-classification); "
                              "a causal LM's limit is --kv-capacity")
        if classifier is not None and self.kv_capacity is not None:
            raise ExportError(f"--kv-capacity is a causal LM's cache slots; a {task} build has no cache: give its "
                              f"most tokens per text as --max-text-tokens")
        limit = min(DEFAULT_KV_CAPACITY, config.max_position_embeddings) if limit is None else limit
        # what the runtime allocates: refuse a config.json past it
        for name in ("vocab_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
            if getattr(config, name) > SIZE_LIMITS[name]:
                raise ExportError(f"{checkpoint}/config.json: {name} {getattr(config, name)} is past what a build "
                                  f"holds ({SIZE_LIMITS[name]}); is this config.json right?")
        if not 2 <= limit <= config.max_position_embeddings:
            raise ExportError(f"{flag} must be in [2, max_position_embeddings={config.max_position_embeddings}], "
                              f"got {limit}")
        flavor = self._flavor()
        engine = self._engine_options(flavor, limit)
        cache_layout = self._cache_layout(flavor, classifier, config)
        if classifier is not None and (self.weights or self.calibration_file):
            raise ExportError(f"--weights and --calibration-file are for causal-lm builds, not {task}")
        quantized = weight_format(self.weights, self.block_size, config, engine=flavor is not None,
                                  lm_head=self.quantize_lm_head)
        why_not = ("has a TensorRT engine" if flavor is not None else f"is a {task}" if classifier is not None else
                   None if cache_layout == "capacity" else f"has cache layout {cache_layout!r}")
        prefill = prefill_format(self.prefill, self.weights, why_not)
        self._check_kv_cache(why_not, cache_layout)
        if self.calibration_file and self.dtype != "float16" and self.kv_cache is None:
            raise ExportError(f"--calibration-file is for --dtype float16 builds (the range report) and --kv-cache "
                              f"int8 (its scales); this build is {self.dtype}")
        return BuildPlan(options=dataclasses.replace(self, task=task, kv_capacity=limit if classifier is None else None,
                                                     max_text_tokens=None if classifier is None else limit,
                                                     cache_layout=cache_layout, engine=engine),
                         flavor=flavor, classifier=classifier, weights=quantized, prefill=prefill)

    def _check_kv_cache(self, why_not: str | None, cache_layout: str) -> None:
        """--kv-cache int8: onnxruntime's GroupQueryAttention keeps an int8 cache (per-channel scales)
        for float32 activations only, in the `capacity` layout; TensorRT keeps its caches in --dtype."""
        if self.kv_cache is None:
            return
        if self.kv_cache != KV_CACHE_INT8:
            raise ExportError(f"--kv-cache {self.kv_cache!r}: the choice is int8 (or leave it out: the cache in "
                              f"--dtype)")
        if why_not is not None or self.dtype != "float32":
            reason = why_not or f"is --dtype {self.dtype}"
            raise ExportError(f"--kv-cache int8 is for onnxruntime builds of --dtype float32 (onnxruntime's "
                              f"GroupQueryAttention quantizes the cache of float32 attention only); this build {reason}"
                              + ("" if why_not else ": add --dtype float32"))

    def _flavor(self) -> Flavor | None:
        """The TensorRT that builds the engine (None: an onnxruntime build, no engine)."""
        backend = self.backend
        if backend == "auto":
            backend = "tensorrt" if TENSORRT.installed()[0] is not None else "onnxruntime"
            if backend == "onnxruntime" and TENSORRT_RTX.installed()[0] is not None:
                log.info("auto: building for onnxruntime; TensorRT-RTX is installed: --backend tensorrt-rtx builds "
                         "an engine for RTX GPUs too")
        flavor = FLAVORS.get(backend)
        if flavor is None and self.dtype == "bfloat16":  # onnxruntime 1.32's CPU provider has no bf16 MatMul
            raise ExportError("--dtype bfloat16 builds run only as TensorRT engines (onnxruntime's CPU provider has "
                              "no bfloat16 MatMul): add --backend tensorrt or --backend tensorrt-rtx, or build "
                              "--dtype float16 for onnxruntime")
        if flavor is not None:
            installed, missing = flavor.installed()
            if installed is None:
                raise ExportError(f"--backend {backend}: {missing}")
        return flavor

    def _engine_options(self, flavor: Flavor | None, limit: int) -> EngineOptions:
        """The engine's options with max_prefill filled in, checked against the installed TensorRT
        (before the export: what it cannot do is refused first); as given without an engine."""
        engine = self.engine.for_capacity(limit)  # --max-prefill is checked whatever the backend, as before
        if flavor is None:
            if self.engine.compute_capabilities:
                raise ExportError("--compute-capabilities is for --backend tensorrt-rtx")
            return engine
        check_engine_options(flavor, engine, self.dtype)
        return engine

    def _cache_layout(self, flavor: Flavor | None, classifier: ClassifierSection | None,
                      config: PersimmonConfig) -> str:
        if classifier is not None:  # a classifier reads whole texts: no cache
            return NO_CACHE
        layout = self.cache_layout or (onnxruntime_cache_layout(config.head_dim) if flavor is None else "window")
        if flavor is not None and layout != "window":
            raise ExportError(f"{flavor.product} builds need cache_layout 'window' (a static cache length for its "
                              f"KV-cache update)")
        return layout


@dataclass(frozen=True)
class BuildPlan:
    """BuildOptions resolved for one checkpoint (`BuildOptions.plan`): what `build` runs."""
    options: BuildOptions               # task, kv_capacity or max_text_tokens, cache_layout, engine filled in
    flavor: Flavor | None               # the TensorRT that builds the engine; None: no engine
    classifier: ClassifierSection | None  # the classifier's labels; None: a causal LM
    weights: WeightFormat | None        # the quantized linears' format; None: weights in dtype
    prefill: WeightFormat | None        # the prefill graph's format; None: no prefill graph

    @property
    def kv_capacity(self) -> int:
        """The manifest's kv_capacity: cache slots (causal LM) or most tokens per text (classifier)."""
        return self.options.kv_capacity or self.options.max_text_tokens

    @property
    def calibrated(self) -> bool:
        """Whether the build first measures ranges with the fp32 reference (`graph.ranges`): for the
        fp16 range report, or the int8 cache's per-channel scales."""
        return self.classifier is None and (self.options.dtype == "float16" or self.options.kv_cache is not None)
