"""The build directory's manifest: the contract between exporter and runtime.

`manifest.json` describes everything the runtime needs: the model's shape, dtype, cache
capacity, graph I/O names and shapes, custom ops, tokenizer settings and file checksums. The
runtime reads nothing else about the model. `Manifest.load` checks every field it reads (one
ManifestError line naming the field) and, by default, the files' checksums (see `verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field

from .errors import PersimmonError
from . import verify

FORMAT = "persimmon-build"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CUSTOM_OP_DOMAIN = "persimmon"
CUSTOM_OP_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20  # real ones are a few KB; bounds what a hostile file makes us parse
ENGINE_FLAVORS = ("tensorrt", "tensorrt-rtx")  # NVIDIA TensorRT, TensorRT-RTX (absent: tensorrt)
STEP_INPUTS = ("input_ids", "cache_position", "token_count", "attention_mask")


class ManifestError(PersimmonError):
    pass


@dataclass
class Manifest:
    dtype: str                     # "float16" | "float32": weights, activations and the cache
    max_batch: int
    kv_capacity: int               # cache slots per sequence (prompt + generated tokens)
    model: dict                    # vocab_size, hidden_size, num_hidden_layers, heads, head_dim, ...
    tokenizer: dict                # file, add_bos, bos_token, eos_token
    eos_token_ids: list
    onnx: dict                     # file, data_file, opset, custom_ops, relu2_scale
    inputs: list                   # [{"name", "dtype", "shape"}], symbolic dims as strings
    outputs: list
    cache_aliases: dict            # output name -> the input it updates in place
    files: dict = field(default_factory=dict)  # name -> {"bytes", "sha256"}
    tensorrt: dict | None = None   # engine builds: flavor, version, engine file, target GPUs, profiles, plugins
    exporter_version: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def num_layers(self) -> int:
        return self.model["num_hidden_layers"]

    @property
    def cache_shape(self) -> tuple:
        """(heads, kv_capacity, head_dim): the cache tensor shape after the batch dimension."""
        return (self.model["num_attention_heads"], self.kv_capacity, self.model["head_dim"])

    @property
    def cache_inputs(self) -> list[str]:
        return list(self.cache_aliases.values())

    def save(self, directory: str) -> str:
        path = os.path.join(directory, MANIFEST_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2)
            f.write("\n")
        return path

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
        raw = _parse(path, data)
        validate(path, raw)
        manifest = cls(**raw)
        verify.check_sizes(directory, manifest.files)
        if verify_checksums:
            verify.verify_checksums(directory, manifest.files, hashlib.sha256(data).hexdigest())
        return manifest


# ---- reading and validating manifest.json ----

def _read_manifest(path: str, directory: str) -> bytes:
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: not found; is {directory} a build directory from `persimmon-export build`?")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a manifest we wrote")
    return data


def _parse(path: str, data: bytes) -> dict:
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start}); the file is corrupt, rebuild") from None
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an integer with thousands of digits
        raise ManifestError(f"{path}: not valid JSON ({str(e)[:120]}); the file is corrupt, rebuild") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a {FORMAT} manifest")
    if raw.get("format_version") != FORMAT_VERSION or isinstance(raw.get("format_version"), bool):
        raise ManifestError(f"{path}: format_version {_show(raw.get('format_version'))}, this runtime reads "
                            f"{FORMAT_VERSION}; rebuild with the matching persimmon-export")
    return raw


def validate(path: str, raw: dict) -> None:
    """Check each field the runtime and exporter read: its presence, type and range."""
    _check(path, "", raw, _section(_TOP_LEVEL, extra_allowed=False))  # raw is a dict: only its fields can fail
    _check_references(path, raw)


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


def _section(spec: dict, extra_allowed: bool = True):
    """A JSON object with the keys of `spec` ({key: (check, required)})."""
    def check(path, name, value):
        if not isinstance(value, dict):
            raise _Invalid("an object")
        for key, (check_value, required) in spec.items():
            where = f"{name}.{key}" if name else key
            if key in value:
                _check(path, where, value[key], check_value)
            elif required:
                raise ManifestError(f"{path}: field {where} is missing; {_REBUILD}")
        unknown = sorted(set(value) - set(spec))
        if unknown and not extra_allowed:
            raise ManifestError(f"{path}: unknown field {unknown[0]!r}; is this manifest from a newer "
                                f"persimmon-export?")
    return check


def _optional(check_value):
    def check(path, name, value):
        if value is not None:
            check_value(path, name, value)
    return check


_STR = _kind("a string", lambda v: isinstance(v, str))
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
_PLUGIN_PTX = _optional(_section({"isa": (_MAJOR_MINOR, True), "min_driver_cuda": (_MAJOR_MINOR, True)},
                                 extra_allowed=False))
_IO = _section({"name": (_STR, True), "dtype": (_STR, True), "shape": (_list_of(_DIM), True)})
_TOP_LEVEL = {
    "format": (_STR, True),
    "format_version": (_count(1), True),
    "dtype": (_one_of("float16", "float32"), True),
    "max_batch": (_count(1), True),
    "kv_capacity": (_count(1), True),
    "model": (_section({key: (_count(1), True) for key in
                        ("vocab_size", "num_hidden_layers", "num_attention_heads", "head_dim")}), True),
    "tokenizer": (_section({"file": (_FILE_NAME, True), "add_bos": (_BOOL, True),
                            "bos_token": (_optional(_STR), True), "eos_token": (_optional(_STR), True)}), True),
    "eos_token_ids": (_list_of(_count(0)), True),
    "onnx": (_section({"file": (_FILE_NAME, True), "data_file": (_FILE_NAME, True),
                       "cache_layout": (_one_of("window", "whole"), False)}), True),
    "inputs": (_list_of(_IO), True),
    "outputs": (_list_of(_IO), True),
    "cache_aliases": (_object_of(_STR), True),
    "files": (_object_of(_section({"bytes": (_count(0, 2**63 - 1), True), "sha256": (_SHA256, True)})), True),
    "tensorrt": (_optional(_section({
        "version": (_STR, True), "engine_file": (_FILE_NAME, True), "onnx_file": (_FILE_NAME, True),
        "max_prefill": (_count(1), True), "profiles": (_list_of(_kind("an object", lambda v: isinstance(v, dict))),
                                                       True),
        "version_compatible": (_BOOL, False),
        "plugin_ptx": (_PLUGIN_PTX, False), "flavor": (_one_of(*ENGINE_FLAVORS), False),
        "compute_capabilities": (_list_of(_COMPUTE_CAPABILITY), False)})), False),
    "exporter_version": (_STR, False),
}


def _check_references(path: str, raw: dict) -> None:
    """Names that point elsewhere in the manifest must exist there: every file the runtime opens is
    listed in `files` (so it is size- and checksum-checked), every cache alias names real I/O."""
    opened = {"tokenizer.file": raw["tokenizer"]["file"], "onnx.file": raw["onnx"]["file"],
              "onnx.data_file": raw["onnx"]["data_file"]}
    if raw.get("tensorrt"):
        opened["tensorrt.engine_file"] = raw["tensorrt"]["engine_file"]
    bad_names = [name for name in raw["files"] if not _is_file_name(name)]
    if bad_names:
        raise ManifestError(f"{path}: files lists {bad_names[0]!r}, which is not a file name in the build "
                            f"directory; {_REBUILD}")
    for where, name in opened.items():
        if name not in raw["files"]:
            raise ManifestError(f"{path}: {where} is {name!r}, which `files` does not list; {_REBUILD}")
    input_names = {spec["name"] for spec in raw["inputs"]}
    output_names = {spec["name"] for spec in raw["outputs"]}
    missing = [name for name in STEP_INPUTS if name not in input_names]
    if missing:
        raise ManifestError(f"{path}: inputs lacks {missing[0]!r}; {_REBUILD}")
    for present, past in raw["cache_aliases"].items():
        if present not in output_names or past not in input_names:
            raise ManifestError(f"{path}: cache_aliases maps {present!r} -> {past!r}, which are not an output and "
                                f"an input of the graph; {_REBUILD}")
    vocab = raw["model"]["vocab_size"]
    if any(token >= vocab for token in raw["eos_token_ids"]):
        raise ManifestError(f"{path}: eos_token_ids has an id >= vocab_size {vocab}; {_REBUILD}")
