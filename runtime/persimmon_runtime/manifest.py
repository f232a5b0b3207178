"""The build directory's manifest: the contract between exporter and runtime.

`manifest.json` describes everything the runtime needs: the model's shape, dtype, cache
capacity, graph I/O names and shapes, custom ops, tokenizer settings and file checksums. The
runtime reads nothing else about the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from .errors import PersimmonError

FORMAT = "persimmon-build"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CUSTOM_OP_DOMAIN = "persimmon"
CUSTOM_OP_VERSION = 1


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
    tensorrt: dict | None = None   # engine file, TensorRT version, GPU, profiles, plugins (TensorRT builds)
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
    def load(cls, directory: str, verify_checksums: bool = False) -> "Manifest":
        """Read and check BUILD_DIR/manifest.json; files must exist with their recorded sizes."""
        directory = os.fspath(directory)
        path = os.path.join(directory, MANIFEST_FILE)
        if not os.path.isfile(path):
            raise ManifestError(f"{path}: not found; is {directory} a build directory from "
                                f"`persimmon-export build`?")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ManifestError(f"{path}: not a {FORMAT} manifest")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{path}: format_version {raw.get('format_version')!r}, this runtime reads "
                                f"{FORMAT_VERSION}; rebuild with the matching persimmon-export")
        try:
            manifest = cls(**raw)
        except TypeError as e:
            raise ManifestError(f"{path}: {e}") from None
        for name, info in manifest.files.items():
            file = os.path.join(directory, name)
            if not os.path.isfile(file):
                raise ManifestError(f"{file}: listed in the manifest but missing; the build is incomplete")
            if os.path.getsize(file) != info["bytes"]:
                raise ManifestError(f"{file}: {os.path.getsize(file)} bytes, the manifest says {info['bytes']}; "
                                    f"the file is truncated or from another build")
            if verify_checksums and sha256_file(file) != info["sha256"]:
                raise ManifestError(f"{file}: sha256 differs from the manifest; the file is corrupt or "
                                    f"from another build")
        return manifest


def sha256_file(path: str, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
