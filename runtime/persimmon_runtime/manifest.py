"""The build directory's manifest: the contract between exporter and runtime.

`manifest.json` describes everything the runtime needs: the model's shape, dtype, cache
capacity, the graph (its files, I/O names and shapes, cache layout, custom ops), the tokenizer
settings, the TensorRT engine if any, and file checksums. The runtime reads nothing else about
the model. Each section is a small typed class with one writer (docs/manifest.md lists every
field, who writes it and who reads it). `Manifest.load` checks every field (one ManifestError
line naming the field) and, by default, the files' checksums (see `verify`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, field

from . import verify
from .custom_ops import CUSTOM_OP_DOMAIN, CUSTOM_OP_VERSION, CUSTOM_OPS
from .errors import PersimmonError
from .regular_files import NotRegularError, read_regular

FORMAT = "persimmon-build"
# 2: typed sections; graph I/O, aliases and layout inside `onnx`; `first_slot` (was
# cache_position); engine profiles recorded by role
# 3: `capacity` graphs take input_ids and attention_mask only (what onnxruntime-genai feeds) and
# give logits [batch, 1, vocab]; such builds list onnxruntime-genai's genai_config.json
FORMAT_VERSION = 3
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # real ones are a few KB; bounds what a hostile file makes us parse
ENGINE_FLAVORS = ("tensorrt", "tensorrt-rtx")  # NVIDIA TensorRT, TensorRT-RTX
# what `persimmon-export build --backend` takes: onnxruntime alone, or also an engine of a flavor
BUILD_BACKENDS = ("auto", "onnxruntime", *ENGINE_FLAVORS)
# a build's dtype: weights, activations and caches (bfloat16: TensorRT engines only, see
# backends/onnxruntime.py); a new value needs no new format version, older readers refuse it
DTYPES = ("float16", "bfloat16", "float32")
# the one cache dtype other than the build's: int8 with per-channel scales in the graph (onnxruntime
# `capacity` builds of dtype float32, `build --kv-cache int8`; GroupQueryAttention's quantized cache)
KV_CACHE_INT8 = "int8"
# The step inputs of a graph, besides its caches, by cache layout. `window` and `whole`: a row's
# new tokens (right-padded to seq), the cache slot its first new token is written to (= tokens
# already cached), how many of the seq tokens are real, and which of the first kv_length slots
# attention may read. `capacity`: the new tokens and the mask alone, as onnxruntime-genai feeds
# them; a row holds as many tokens as its mask has 1s, in its first slots, the new ones last (or
# from slot 0: a right-padded first step) (backends/step.py `step_feeds` makes them from the four).
STEP_INPUTS = {"window": ("input_ids", "first_slot", "token_count", "attention_mask"),
               "whole": ("input_ids", "first_slot", "token_count", "attention_mask"),
               "capacity": ("input_ids", "attention_mask")}
STEP_INPUT_SHAPES = {"input_ids": ["batch", "seq"], "first_slot": ["batch"], "token_count": ["batch"],
                     "attention_mask": ["batch", "kv_length"]}
# How a graph's cache tensors span the slot axis (onnx.cache_layout):
CACHE_LAYOUTS = {
    "window": "caches always hold all kv_capacity slots (the static shape TensorRT's KV-cache update needs); "
              "attention reads a window of them: the first kv_length slots",
    "whole": "caches are kv_length slots long (a graph dimension the runtime grows in steps, by copying) and "
             "attention reads them whole, so onnxruntime copies no slice (onnxruntime builds before `capacity`)",
    "capacity": "caches hold all kv_capacity slots, allocated once; GroupQueryAttention writes and reads each row's "
                "slots up to its last new token, so the cost follows the context (onnxruntime builds)",
}
# TensorRT optimization profiles, by the steps they serve: prefill (many new tokens per row)
# and decode (one new token per row). The engine's profile index is the position in the list.
PROFILE_ROLES = ("prefill", "decode")
CACHE_UPDATES = ("tensor_scatter", "scatter_elements")  # in place (KV-cache-update layer) or two buffers
# weight-only quantized builds: the op that multiplies by the int8/int4 weights (weights.op):
# onnxruntime's fused com.microsoft op, or TensorRT's DequantizeLinear-into-MatMul pattern
WEIGHT_OPS = ("MatMulNBits", "DequantizeLinear")
# prefill graphs (section `prefill`): the op that multiplies int8 weights by int8-quantized activations
PREFILL_OPS = ("DynamicQuantizeMatMul",)
WEIGHT_TYPES = ("int8", "int4")
# What a build computes (top-level `task`; builds from before classifiers lack it: causal-lm).
# Classifier builds have no cache: their graph reads whole texts (input_ids and attention_mask)
# and returns `logits` per text or per token.
CAUSAL_LM = "causal-lm"
TASKS = {
    CAUSAL_LM: "next-token logits over a KV cache (the step graph); served by Generator",
    "sequence-classification": "logits [batch, num_labels] at each text's last non-padding token; served by Classifier",
    "token-classification": "logits [batch, seq, num_labels] for every token; served by Classifier",
}
CLASSIFIER_INPUTS = ("input_ids", "attention_mask")
# how a classifier's scores come from its logits (classifier.problem_type, transformers' names):
# softmax over the labels, a sigmoid per label, or the logits as they are
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
NO_CACHE = "none"  # onnx.cache_layout and tensorrt.cache_update of classifier builds
CLASSIFY_ROLE = "classify"  # the one TensorRT profile of a classifier engine


# The most of each size the runtime allocates from (checked at build and at load): a tampered or
# mistyped value is refused in one line instead of dying in an allocation (a MemoryError traceback).
# Logits alone are max_batch x vocab_size x 4 bytes: 1 GiB at 1024 rows of Persimmon's 262144.
SIZE_LIMITS = {"max_batch": 1024, "kv_capacity": 1 << 20, "vocab_size": 1 << 24, "num_hidden_layers": 1024,
               "num_attention_heads": 1024, "head_dim": 1024}


class ManifestError(PersimmonError):
    pass


class OutdatedBuildError(ManifestError):
    """A build from an older persimmon-export: its manifest format is one this runtime no longer reads."""


# ---- checks of JSON values: each raises one line naming the field ----

_REBUILD = "the manifest is corrupt or was edited, rebuild"


class _Invalid(Exception):
    """Raised by a field check with what the field must be; `_check` adds the file and field."""


def _check(path: str, name: str, value, check) -> None:
    try:
        check(path, name, value)
    except _Invalid as e:
        raise ManifestError(f"{path}: field {name} must be {e}, got {_show(value)}; {_REBUILD}") from None


def _show(value) -> str:
    text = type(value).__name__ if isinstance(value, (dict, list)) else f"{type(value).__name__} {value!r}"
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(what: str, accepts):
    def check(path, name, value):
        if not accepts(value):
            raise _Invalid(what)
    return check


def _count(low: int, high: int = 2**31 - 1):
    return _kind(f"an integer in {low}..{high}", lambda v: type(v) is int and low <= v <= high)


def _one_of(*choices):
    return _kind(" or ".join(map(repr, choices)), lambda v: isinstance(v, str) and v in choices)


def _is_file_name(value) -> bool:
    """A plain name inside the build directory: never a path that could point elsewhere."""
    return (isinstance(value, str) and value not in ("", ".", "..") and "\0" not in value
            and "/" not in value and "\\" not in value)


def _list_of(item):
    def check(path, name, value):
        if not isinstance(value, list):
            raise _Invalid("a list")
        for index, element in enumerate(value):
            _check(path, f"{name}[{index}]", element, item)
    return check


def _object_of(value_check):
    """A JSON object whose keys are any strings (JSON keys always are) and values pass value_check."""
    def check(path, name, value):
        if not isinstance(value, dict):
            raise _Invalid("an object")
        for key, element in value.items():
            _check(path, f"{name}[{key!r}]", element, value_check)
    return check


def _fields(spec: dict, may_be_absent: tuple = ()):
    """A JSON object with exactly the keys of `spec` ({key: check}): a missing one (unless in
    may_be_absent: optional sections added since the format version) or an unknown one is refused."""
    def check(path, name, value):
        if not isinstance(value, dict):
            raise _Invalid("an object")
        for key, check_value in spec.items():
            where = f"{name}.{key}" if name else key
            if key not in value and key in may_be_absent:
                continue
            if key not in value:
                raise ManifestError(f"{path}: field {where} is missing; {_REBUILD}")
            _check(path, where, value[key], check_value)
        unknown = sorted(set(value) - set(spec))
        if unknown:
            where = f"{name}.{unknown[0]}" if name else unknown[0]
            raise ManifestError(f"{path}: unknown field {where!r}; is this manifest from a newer persimmon-export?")
    return check


def _optional(check_value):
    def check(path, name, value):
        if value is not None:
            check_value(path, name, value)
    return check


def _is_text(value) -> bool:
    """A str that is valid Unicode: JSON's \\ud800 escapes give lone surrogates, which break encoding later."""
    try:
        return isinstance(value, str) and value.encode("utf-8") is not None
    except UnicodeEncodeError:
        return False


_STR = _kind("a string of valid Unicode", _is_text)
_BOOL = _kind("true or false", lambda v: isinstance(v, bool))
_FILE_NAME = _kind("a file name in the build directory (no path)", _is_file_name)
_SHA256 = _kind("64 lowercase hex digits", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v))
_DIM = _kind("a dimension (an integer >= 0 or a name)",
             lambda v: isinstance(v, str) or (type(v) is int and v >= 0))
# the GPUs an engine was built for, as 'major.minor' ('8.6', '12.0')
_COMPUTE_CAPABILITY = _kind("a compute capability such as '8.6'",
                            lambda v: isinstance(v, str) and re.fullmatch(r"[0-9]{1,2}\.[0-9]", v))
# what a driver needs to JIT-compile the plugins' PTX in an engine (PTX ISA and CUDA versions)
_MAJOR_MINOR = _kind("a version such as '9.0'",
                     lambda v: isinstance(v, str) and re.fullmatch(r"[0-9]{1,2}\.[0-9]{1,2}", v))
_SHAPE = _list_of(_count(0))  # a concrete tensor shape
# a maximum |x|: finite (JSON has no inf) and >= 0
_MAX_ABS = _kind("a finite number >= 0", lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0)
_POWER_OF_TWO_SCALE = _kind("a power of two in 1..16", lambda v: v in (1, 2, 4, 8, 16) and type(v) is not bool)
_BLOCK_SIZE = _kind("a power of two >= 16", lambda v: type(v) is int and v >= 16 and not v & (v - 1))


def _min_opt_max(path, name, value):
    """An input's [min, opt, max] shapes in an optimization profile."""
    if not (isinstance(value, list) and len(value) == 3):
        raise _Invalid("a list of 3 shapes [min, opt, max]")
    for index, shape in enumerate(value):
        _check(path, f"{name}[{index}]", shape, _SHAPE)


# the tensor kinds a range report measures per layer (persimmon_export.graph.ranges.KINDS)
RANGE_KINDS = ("qkv", "query", "key", "attention_scores", "attention_output", "residual", "mlp_pre_activation",
               "mlp_activation", "mlp_output")


def _spec(check=None, *, absent_ok: bool = False, **kwargs):
    """A section field with its JSON check: `check` where its type does not say enough (a range, a
    choice, a file name; None: derived from the type, see `_check_for`); absent_ok: a manifest may
    lack it (a field added since the format version)."""
    return field(metadata={"check": check, "absent_ok": absent_ok}, **kwargs)


# ---- the sections ----
# Each is written by one stage; its fields' types and `_spec` checks are the whole schema: load
# checks every field from them (`_check_for`) and builds the section from them (`_from_json`).

@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""
    name: str
    dtype: str = _spec(_one_of("int64", *DTYPES, KV_CACHE_INT8))
    shape: list = _spec(_list_of(_DIM))  # integers, or names of dimensions that vary ("batch", "seq", "kv_length")


@dataclass(frozen=True)
class ModelShape:
    """Section `model`, written by build from the checkpoint's config: the shapes the runtime allocates."""
    vocab_size: int = _spec(_count(1, SIZE_LIMITS["vocab_size"]))
    num_hidden_layers: int = _spec(_count(1, SIZE_LIMITS["num_hidden_layers"]))
    num_attention_heads: int = _spec(_count(1, SIZE_LIMITS["num_attention_heads"]))
    head_dim: int = _spec(_count(1, SIZE_LIMITS["head_dim"]))


@dataclass(frozen=True)
class TokenizerSection:
    """Section `tokenizer`, written by build from the checkpoint's tokenizer files."""
    file: str = _spec(_FILE_NAME)  # the sentencepiece model, in the build directory
    add_bos: bool = _spec()
    bos_token: str | None = _spec()
    eos_token: str | None = _spec()
    # the chat format as a Jinja chat template (`chat.CHAT_TEMPLATE`); absent: an older build, which
    # chats in that same format
    chat_template: str | None = _spec(absent_ok=True, default=None)


@dataclass(frozen=True)
class CustomOps:
    """The custom ops the graph uses (see `custom_ops`), each with a function body of standard ops."""
    domain: str = _spec(_one_of(CUSTOM_OP_DOMAIN))
    version: int = _spec(_count(CUSTOM_OP_VERSION, CUSTOM_OP_VERSION))
    ops: list = _spec(_list_of(_one_of(*CUSTOM_OPS)))


@dataclass(frozen=True)
class GraphSection:
    """Section `onnx`, written by the exporter (`export.export_onnx`): the step graph and its contract."""
    file: str = _spec(_FILE_NAME)              # model.onnx
    data_file: str = _spec(_FILE_NAME)         # its external weights
    cache_layout: str = _spec(_one_of(*CACHE_LAYOUTS, NO_CACHE))  # a key of CACHE_LAYOUTS
    custom_ops: CustomOps = _spec()
    inputs: list[TensorSpec] = _spec()         # STEP_INPUTS, then past_{key,value}_{layer}
    outputs: list[TensorSpec] = _spec()        # logits, then present_{key,value}_{layer}
    cache_aliases: dict[str, str] = _spec()    # present_* output -> the past_* input it updates in place
    # what an ONNX runtime must read (absent: a build from before they were recorded)
    ir_version: int | None = _spec(_count(3, 1000), absent_ok=True, default=None)  # the model's ONNX IR version
    # domain ("ai.onnx", "persimmon", "com.microsoft") -> opset version
    opset_imports: dict | None = _spec(_object_of(_count(1, 1000)), absent_ok=True, default=None)

    def versions(self) -> str:
        """'IR 8, opsets ai.onnx 17, persimmon 1, com.microsoft 1', for messages."""
        if self.ir_version is None or not self.opset_imports:
            return "IR version and opsets not recorded: a build from an older persimmon-export"
        return f"IR {self.ir_version}, opsets " + ", ".join(f"{d} {v}" for d, v in self.opset_imports.items())


@dataclass(frozen=True)
class PluginPtx:
    """What a driver needs to JIT-compile the plugins' PTX embedded in an engine."""
    isa: str = _spec(_MAJOR_MINOR)              # PTX ISA version, '9.0'
    min_driver_cuda: str = _spec(_MAJOR_MINOR)  # the oldest CUDA release whose driver compiles it, '13.0'


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: the step it serves and, per input, [min, opt, max] shapes."""
    role: str = _spec(_one_of(*PROFILE_ROLES, CLASSIFY_ROLE))
    shapes: dict = _spec(_object_of(_min_opt_max))


@dataclass(frozen=True)
class EngineSection:
    """Section `tensorrt`, written by `engine.build_engine` (absent: no engine)."""
    flavor: str = _spec(_one_of(*ENGINE_FLAVORS))  # which TensorRT runs the engine
    version: str = _spec()                   # the TensorRT (or TensorRT-RTX) version that built it
    engine_file: str = _spec(_FILE_NAME)
    onnx_file: str = _spec(_FILE_NAME)       # the ONNX it was built from (model.onnx, or the fallback model.trt.onnx)
    # GPUs it runs on ('8.6'); empty: the kind of GPU that built it
    compute_capabilities: list = _spec(_list_of(_COMPUTE_CAPABILITY))
    version_compatible: bool = _spec()       # loads on newer TensorRT (embedded lean runtime)
    cache_update: str = _spec(_one_of(*CACHE_UPDATES, NO_CACHE))
    plugin_ptx: PluginPtx | None = _spec()   # None: no plugins (the custom ops run as their function bodies)
    max_prefill: int = _spec(_count(1))      # most new tokens per row in one step
    profiles: list[Profile] = _spec()        # in the engine's profile order
    polygraphy: str = _spec()                # the `polygraphy convert` line that rebuilds the same engine by hand
    trtexec: str | None = _spec()            # the same as a trtexec line (None: TensorRT-RTX, which has no trtexec)

    def profile_index(self, role: str) -> int:
        """The engine's optimization profile for `role` ('prefill' or 'decode')."""
        return next(index for index, profile in enumerate(self.profiles) if profile.role == role)


@dataclass(frozen=True)
class WeightRange:
    """max |W| of one tensor as the build stores it (after the relu^2 folding)."""
    tensor: str
    max_abs: float = _spec(_MAX_ABS)


@dataclass(frozen=True)
class RangeSection:
    """Section `ranges`, written by build for float16 builds (`persimmon_export.graph.ranges`; absent or
    null: float32 builds and builds from before the report). Maxima of |x| on the calibration
    prompts in the fp32 reference, scaled as the fp16 graph stores them; read by people only."""
    calibration: str                         # "built-in" or the --calibration-file's name
    prompts: int = _spec(_count(1))
    tokens: int = _spec(_count(1))
    limit: float = _spec(_MAX_ABS)           # 65504, float16's largest finite value
    relu2_scales: list = _spec(_list_of(_POWER_OF_TWO_SCALE))  # per layer: s in W1/s, b1/s, W2*s^2
    # RANGE_KINDS entry -> [max |x| per layer]
    activations: dict = _spec(_fields({kind: _list_of(_MAX_ABS) for kind in RANGE_KINDS}))
    logits: float = _spec(_MAX_ABS)
    weights: list[WeightRange] = _spec()     # every tensor stored in fp16
    # limit / the largest of all the above (at least 1 below; >= 1 is what holds)
    lowest_headroom: float = _spec(_MAX_ABS)
    lowest_at: str = _spec()                 # where that largest value is


@dataclass(frozen=True)
class WeightsSection:
    """Section `weights`, written by build (`persimmon_export.graph.quantize`) for weight-only quantized
    builds (absent or null: every weight is stored in `dtype`)."""
    type: str = _spec(_one_of(*WEIGHT_TYPES))      # the linear weights' integer codes
    block_size: int | None = _spec(_optional(_BLOCK_SIZE))  # inputs (K) per scale; None: one per output channel
    op: str = _spec(_one_of(*WEIGHT_OPS))
    tensors: list[str] = _spec()  # name suffixes of the quantized weights ('dense.weight', 'lm_head.weight')


@dataclass(frozen=True)
class PrefillSection:
    """Section `prefill`, written by `build --prefill int8` for onnxruntime builds (absent or null:
    none): a second step graph with the inputs, outputs and caches of `onnx`, for steps of at least
    `min_tokens` new tokens per row, whose linears multiply int8 weights by activations quantized
    at run time (`op`); the runtime uses it on CPUs with integer matrix units (see
    `persimmon_runtime.cpu`). Every other tensor is read from `onnx.data_file`."""
    file: str = _spec(_FILE_NAME)            # prefill.onnx
    data_file: str = _spec(_FILE_NAME)       # its int8 weights
    weights: str = _spec(_one_of("int8"))    # the codes of `tensors`, one scale per output channel
    op: str = _spec(_one_of(*PREFILL_OPS))
    tensors: list[str] = _spec()             # name suffixes of the weights it holds ('dense.weight')
    # steps with fewer new tokens per row run `onnx.file`
    min_tokens: int = _spec(_count(1, SIZE_LIMITS["kv_capacity"]))


@dataclass(frozen=True)
class ClassifierSection:
    """Section `classifier`, written by build for classifier tasks (`persimmon_export.graph.classify`;
    absent or null: causal-lm builds), from the checkpoint's config.json."""
    labels: list[str]                          # label names by index: config.json's id2label
    problem_type: str = _spec(_one_of(*PROBLEM_TYPES))  # softmax, sigmoid or raw scores
    # what the runtime pads with; sequence classification pools at the rightmost token that is
    # not this (None: one text per batch)
    pad_token_id: int | None = _spec(_optional(_count(0)))


@dataclass(frozen=True)
class FileEntry:
    """One file of the build (`files`): what the runtime checks before opening it."""
    bytes: int = _spec(_count(0, 2**63 - 1))
    sha256: str = _spec(_SHA256)


@dataclass
class Manifest:
    dtype: str = _spec(_one_of(*DTYPES))   # weights, activations and the cache
    max_batch: int = _spec(_count(1, SIZE_LIMITS["max_batch"]))
    # cache slots per sequence (prompt + generated tokens); a classifier's max_text_tokens
    kv_capacity: int = _spec(_count(1, SIZE_LIMITS["kv_capacity"]))
    model: ModelShape = _spec()
    tokenizer: TokenizerSection = _spec()
    eos_token_ids: list = _spec(_list_of(_count(0)))
    onnx: GraphSection = _spec()
    files: dict[str, FileEntry] = _spec(default_factory=dict)  # every file the runtime opens
    tensorrt: EngineSection | None = _spec(default=None)
    exporter_version: str = _spec(default="")
    # optional sections, added since format version 2 (none changes how the runtime runs a step)
    ranges: RangeSection | None = _spec(absent_ok=True, default=None)
    weights: WeightsSection | None = _spec(absent_ok=True, default=None)
    prefill: PrefillSection | None = _spec(absent_ok=True, default=None)  # onnxruntime builds: int8 prefill graph
    task: str = _spec(_one_of(*TASKS), absent_ok=True, default=CAUSAL_LM)  # absent: a causal LM
    classifier: ClassifierSection | None = _spec(absent_ok=True, default=None)  # classifier tasks only
    format: str = _spec(default=FORMAT)
    format_version: int = _spec(_count(1), default=FORMAT_VERSION)

    @property
    def max_text_tokens(self) -> int:
        """A classifier build's most tokens per text (`build --max-text-tokens`): it has no cache, and
        the file keeps this limit in its `kv_capacity` field."""
        return self.kv_capacity

    @property
    def cache_shape(self) -> tuple:
        """(heads, kv_capacity, head_dim): the cache tensor shape after the batch dimension."""
        return (self.model.num_attention_heads, self.kv_capacity, self.model.head_dim)

    @property
    def cache_aliases(self) -> dict:
        return self.onnx.cache_aliases

    @property
    def cache_inputs(self) -> list[str]:
        return list(self.onnx.cache_aliases.values())

    @property
    def cache_dtype(self) -> str:
        """The caches' dtype: the build's, or int8 (`build --kv-cache int8`)."""
        caches = set(self.cache_inputs)
        return next((spec.dtype for spec in self.onnx.inputs if spec.name in caches), self.dtype)

    @property
    def step_inputs(self) -> list[str]:
        """The graph's inputs besides its caches (manifest.STEP_INPUTS of its layout)."""
        caches = set(self.cache_inputs)
        return [spec.name for spec in self.onnx.inputs if spec.name not in caches]

    @property
    def logits_shape(self) -> list:
        """The step graph's logits shape: ["batch", vocab], or ["batch", 1, vocab] (`capacity`)."""
        return next(spec.shape for spec in self.onnx.outputs if spec.name == "logits")

    def save(self, directory: str) -> str:
        path = os.path.join(directory, MANIFEST_FILE)
        raw = asdict(self)
        if raw["prefill"] is None:  # absent, not null: runtimes from before the section still read the build
            del raw["prefill"]
        validate(path, raw)  # never write what load would refuse
        with open(path, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=2)
            f.write("\n")
        return path

    @classmethod
    def from_dict(cls, raw: dict) -> "Manifest":
        """A Manifest from a dict that `validate` accepted."""
        return _from_json(cls, raw)

    @classmethod
    def load(cls, directory: str, verify_checksums: bool = True) -> "Manifest":
        """Read and check BUILD_DIR/manifest.json and the files it lists.

        Every listed file must exist with its recorded size and (unless verify_checksums is
        False) sha256; a file verified unchanged before is not hashed again (see `verify`).
        """
        if not isinstance(directory, (str, os.PathLike)):
            raise ManifestError(f"build directory {directory!r} is not a path")
        directory = os.fspath(directory)
        path = os.path.join(directory, MANIFEST_FILE)
        data = _read_manifest(path, directory)
        raw = _parse(path, data, directory)
        validate(path, raw)
        manifest = cls.from_dict(raw)
        verify.check_sizes(directory, manifest.files)
        if verify_checksums:
            verify.verify_checksums(directory, manifest.files, hashlib.sha256(data).hexdigest())
        return manifest


# ---- the schema, derived from the sections ----

def _check_for(hint):
    """The JSON check of a value of type `hint`: a section checks each of its fields (`_spec`'s
    check, else the field type's), lists and objects each element, `X | None` allows null."""
    if dataclasses.is_dataclass(hint):
        return _SCHEMAS.get(hint) or _SCHEMAS.setdefault(hint, _section_check(hint))
    if hint is str:
        return _STR
    if hint is bool:
        return _BOOL
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        return _optional(_check_for(next(a for a in args if a is not type(None))))
    if typing.get_origin(hint) is list:
        return _list_of(_check_for(args[0]))
    if typing.get_origin(hint) is dict:
        return _object_of(_check_for(args[1]))
    raise TypeError(f"no check for {hint!r}: give its field a _spec(check)")  # a new field without one


def _section_check(cls):
    hints = _type_hints(cls)
    fields = dataclasses.fields(cls)
    return _fields({f.name: f.metadata.get("check") or _check_for(hints[f.name]) for f in fields},
                   may_be_absent=tuple(f.name for f in fields if f.metadata.get("absent_ok")))


_SCHEMAS: dict = {}
# a section's field types, resolved once (every load builds many sections: a TensorSpec per cache)
_type_hints = functools.cache(typing.get_type_hints)


def _from_json(hint, value):
    """`value` (JSON that `_check_for(hint)` accepted) as `hint`: sections built field by field."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        hints = _type_hints(hint)
        return hint(**{f.name: _from_json(hints[f.name], value[f.name])
                       for f in dataclasses.fields(hint) if f.name in value})
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        return _from_json(next(a for a in args if a is not type(None)), value)
    if typing.get_origin(hint) is list:
        return [_from_json(args[0], element) for element in value]
    if typing.get_origin(hint) is dict:
        return {key: _from_json(args[1], element) for key, element in value.items()}
    return value


# ---- reading and validating manifest.json ----

def _read_manifest(path: str, directory: str) -> bytes:
    try:
        return read_regular(path, MAX_MANIFEST_BYTES, "a manifest")  # (a FIFO or device: one line)
    except FileNotFoundError:  # (a dangling link too)
        raise ManifestError(f"{path}: not found; is {directory} a build directory from `persimmon-export build`?") \
            from None
    except NotRegularError as e:
        raise ManifestError(str(e)) from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None


def _parse(path: str, data: bytes, directory: str) -> dict:
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start}); the file is corrupt, rebuild") from None
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an integer with thousands of digits
        raise ManifestError(f"{path}: not valid JSON ({str(e)[:120]}); the file is corrupt, rebuild") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a {FORMAT} manifest")
    version = raw.get("format_version")
    if type(version) is int and 1 <= version < FORMAT_VERSION:
        raise OutdatedBuildError(f"{path}: format_version {version} is from an older persimmon-export; this "
                                 f"runtime reads {FORMAT_VERSION}: rebuild with `persimmon-export build "
                                 f"--checkpoint CHECKPOINT --out {directory} --overwrite`")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ManifestError(f"{path}: format_version {_show(version)}, this runtime reads {FORMAT_VERSION}; "
                            f"upgrade persimmon_runtime to match the persimmon-export that wrote it, or rebuild "
                            f"with this one")
    return raw


def validate(path: str, raw: dict) -> None:
    """Check each field the runtime and exporter read: its presence, type and range."""
    _check(path, "", raw, _check_for(Manifest))  # raw is a dict: only its fields can fail
    _check_references(path, raw)


def _check_references(path: str, raw: dict) -> None:
    """Names that point elsewhere in the manifest must exist there: every file the runtime opens is
    listed in `files` (so it is size- and checksum-checked), every cache alias names real I/O."""
    graph, engine = raw["onnx"], raw["tensorrt"]
    opened = {"tokenizer.file": raw["tokenizer"]["file"], "onnx.file": graph["file"],
              "onnx.data_file": graph["data_file"]}
    if engine is not None:
        opened["tensorrt.engine_file"] = engine["engine_file"]
    prefill = raw.get("prefill")
    if prefill is not None:
        opened.update({"prefill.file": prefill["file"], "prefill.data_file": prefill["data_file"]})
        if raw.get("task", CAUSAL_LM) != CAUSAL_LM or graph["cache_layout"] != "capacity":
            raise ManifestError(f"{path}: a prefill graph belongs to a {CAUSAL_LM} build with cache layout "
                                f"'capacity'; {_REBUILD}")
    bad_names = [name for name in raw["files"] if not (_is_file_name(name) and _is_text(name))]
    if bad_names:
        raise ManifestError(f"{path}: files lists {bad_names[0]!r}, which is not a file name in the build "
                            f"directory; {_REBUILD}")
    for where, name in opened.items():
        if name not in raw["files"]:
            raise ManifestError(f"{path}: {where} is {name!r}, which `files` does not list; {_REBUILD}")
    if raw.get("task", CAUSAL_LM) == CAUSAL_LM:
        _check_step_graph(path, raw)
    else:
        _check_classifier_graph(path, raw)
    layers = raw["model"]["num_hidden_layers"]
    ranges = raw.get("ranges")
    if ranges is not None:
        lengths = {len(ranges["relu2_scales"])} | {len(values) for values in ranges["activations"].values()}
        if lengths != {layers}:
            raise ManifestError(f"{path}: ranges has per-layer lists of {sorted(lengths)} values, but "
                                f"model.num_hidden_layers is {layers}; {_REBUILD}")
    vocab = raw["model"]["vocab_size"]
    if any(token >= vocab for token in raw["eos_token_ids"]):
        raise ManifestError(f"{path}: eos_token_ids has an id >= vocab_size {vocab}; {_REBUILD}")


def _check_step_graph(path: str, raw: dict) -> None:
    """A causal LM's step graph: the step inputs, a key and a value cache per layer, both engine profiles."""
    graph, engine = raw["onnx"], raw["tensorrt"]
    layers = raw["model"]["num_hidden_layers"]
    if raw.get("classifier") is not None or graph["cache_layout"] == NO_CACHE:
        raise ManifestError(f"{path}: a {CAUSAL_LM} build has a classifier section or cache layout "
                            f"{NO_CACHE!r}; {_REBUILD}")
    input_names = {spec["name"] for spec in graph["inputs"]}
    output_names = {spec["name"] for spec in graph["outputs"]}
    missing = [name for name in STEP_INPUTS.get(graph["cache_layout"], ()) if name not in input_names]
    if missing:
        raise ManifestError(f"{path}: onnx.inputs lacks {missing[0]!r}; {_REBUILD}")
    for present, past in graph["cache_aliases"].items():
        if present not in output_names or past not in input_names:
            raise ManifestError(f"{path}: onnx.cache_aliases maps {present!r} -> {past!r}, which are not an output "
                                f"and an input of the graph; {_REBUILD}")
    model = raw["model"]
    slots = "kv_length" if graph["cache_layout"] == "whole" else raw["kv_capacity"]
    cache_shape = ["batch", model["num_attention_heads"], slots, model["head_dim"]]
    shapes = {spec["name"]: spec["shape"] for spec in graph["inputs"] + graph["outputs"]}
    dtypes = {spec["name"]: spec["dtype"] for spec in graph["inputs"] + graph["outputs"]}
    int8_allowed = graph["cache_layout"] == "capacity" and raw["dtype"] == "float32"
    for name in list(graph["cache_aliases"]) + list(graph["cache_aliases"].values()):
        if dtypes.get(name) not in (raw["dtype"], *([KV_CACHE_INT8] if int8_allowed else [])):
            raise ManifestError(f"{path}: onnx cache {name!r} is {dtypes.get(name)}, but a {raw['dtype']} build's "
                                f"caches are {raw['dtype']}" + (" or int8" if int8_allowed else "") + f"; {_REBUILD}")
        if shapes.get(name) != cache_shape:
            raise ManifestError(f"{path}: onnx cache {name!r} has shape {shapes.get(name)}, but model and kv_capacity "
                                f"give {cache_shape}; {_REBUILD}")
    vocab = model["vocab_size"]
    logits = ["batch", 1, vocab] if graph["cache_layout"] == "capacity" else ["batch", vocab]
    if shapes.get("logits") != logits:
        raise ManifestError(f"{path}: onnx logits shape {shapes.get('logits')} does not end in model.vocab_size "
                            f"{model['vocab_size']}; {_REBUILD}")
    if len(graph["cache_aliases"]) != 2 * layers:  # a key and a value cache per layer
        raise ManifestError(f"{path}: onnx.cache_aliases pairs {len(graph['cache_aliases'])} caches, but "
                            f"model.num_hidden_layers {layers} needs {2 * layers}; {_REBUILD}")
    if engine is not None:
        roles = [profile["role"] for profile in engine["profiles"]]
        if sorted(roles) != sorted(PROFILE_ROLES):
            raise ManifestError(f"{path}: tensorrt.profiles has roles {roles}, expected one each of "
                                f"{list(PROFILE_ROLES)}; {_REBUILD}")


def _check_classifier_graph(path: str, raw: dict) -> None:
    """A classifier graph: input_ids and attention_mask in, logits with one value per label out, no cache."""
    graph, engine, classifier = raw["onnx"], raw["tensorrt"], raw.get("classifier")
    task = raw["task"]
    if classifier is None:
        raise ManifestError(f"{path}: a {task} build needs the classifier section; {_REBUILD}")
    inputs = [spec["name"] for spec in graph["inputs"]]
    outputs = graph["outputs"]
    if inputs != list(CLASSIFIER_INPUTS) or [spec["name"] for spec in outputs] != ["logits"]:
        raise ManifestError(f"{path}: a {task} graph takes {list(CLASSIFIER_INPUTS)} and gives ['logits'], this one "
                            f"{inputs} -> {[spec['name'] for spec in outputs]}; {_REBUILD}")
    if graph["cache_aliases"] or graph["cache_layout"] != NO_CACHE:
        raise ManifestError(f"{path}: a {task} graph has no cache (cache_layout {NO_CACHE!r}, no cache_aliases); "
                            f"{_REBUILD}")
    names = classifier["labels"]
    if len(set(names)) != len(names):
        duplicate = next(name for name, count in collections.Counter(names).items() if count > 1)
        raise ManifestError(f"{path}: classifier.labels names {duplicate!r} twice (their scores would merge); "
                            f"{_REBUILD}")
    labels = len(names)
    rank = 2 if task == "sequence-classification" else 3
    shape = outputs[0]["shape"]
    if len(shape) != rank or shape[-1] != labels or labels < 1:
        raise ManifestError(f"{path}: onnx logits shape {shape} does not fit a {task} with {labels} labels "
                            f"(classifier.labels); {_REBUILD}")
    pad = classifier["pad_token_id"]
    if pad is not None and pad >= raw["model"]["vocab_size"]:
        raise ManifestError(f"{path}: classifier.pad_token_id {pad} is >= vocab_size; {_REBUILD}")
    if engine is not None and [profile["role"] for profile in engine["profiles"]] != [CLASSIFY_ROLE]:
        raise ManifestError(f"{path}: tensorrt.profiles of a {task} engine must be one {CLASSIFY_ROLE!r} profile; "
                            f"{_REBUILD}")
