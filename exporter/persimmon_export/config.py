"""Persimmon configuration: the fields of a Hugging Face `config.json`, validated.

Reads both the hub's layout (`rope_theta`, `partial_rotary_factor`, `rope_scaling`) and the
transformers-5 layout (`rope_parameters`); writes the hub's layout, which every transformers
release reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.manifest import DTYPES
from persimmon_runtime.regular_files import read_regular

# real ones are a few KB (id2label included): the bound is on what a hostile file makes us parse
MAX_CONFIG_BYTES = 16 << 20

ACTIVATIONS = ("relu2", "relu", "gelu", "gelu_pytorch_tanh", "silu")
ROPE_SCALING_TYPES = ("linear", "dynamic")

# Keys HF writes that carry nothing for this model (bookkeeping, generation defaults).
_IGNORED_KEYS = {
    "model_type", "architectures", "transformers_version", "id2label", "label2id",
    "_name_or_path", "auto_map", "output_attentions", "output_hidden_states", "return_dict",
    "problem_type", "is_encoder_decoder", "dtype",
}


class ConfigError(PersimmonError):
    pass


@dataclass
class PersimmonConfig:
    vocab_size: int = 262144
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    hidden_act: str = "relu2"
    max_position_embeddings: int = 16384
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 25000.0
    rope_scaling: dict | None = None  # {"type": "linear" | "dynamic", "factor": float}
    qk_layernorm: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    partial_rotary_factor: float = 0.5
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    torch_dtype: str | None = None
    num_labels: int = 2
    classifier_dropout: float | None = None

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        """Leading dims of each head that get rotary; the rest pass through (HF's `rotary_ndims`)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_scaling_type(self) -> str | None:
        if not self.rope_scaling:
            return None
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                f"({self.hidden_size})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(
                f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.rotary_dims < 2 or self.rotary_dims % 2:
            raise ConfigError(
                f"rotary dims = int(head_dim {self.head_dim} * partial_rotary_factor "
                f"{self.partial_rotary_factor}) = {self.rotary_dims}; it must be even and >= 2")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; use one of {ACTIVATIONS}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_scaling:
            kind = self.rope_scaling_type
            if kind not in ROPE_SCALING_TYPES:
                raise ConfigError(
                    f"rope_scaling type {kind!r} is not supported; use one of {ROPE_SCALING_TYPES} or null")
            factor = self.rope_scaling.get("factor")
            if not isinstance(factor, (int, float)) or factor < 1.0:
                raise ConfigError(f"rope_scaling factor must be a number >= 1, got {factor!r}")
        ids = [self.pad_token_id, self.bos_token_id]
        ids += self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for token_id in ids:
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ConfigError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        if self.torch_dtype is not None and self.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype {self.torch_dtype!r} is not one of {DTYPES}")

    @classmethod
    def from_dict(cls, raw: dict) -> "PersimmonConfig":
        raw = dict(raw)
        model_type = raw.get("model_type")
        if model_type != "persimmon":
            raise ConfigError(f"model_type is {model_type!r}, not 'persimmon': this is not a Persimmon config")
        rope = raw.pop("rope_parameters", None)
        if rope:  # transformers-5 layout: fold back into the hub's fields
            rope = dict(rope)
            raw.setdefault("rope_theta", rope.pop("rope_theta", cls.rope_theta))
            raw.setdefault("partial_rotary_factor", rope.pop("partial_rotary_factor", cls.partial_rotary_factor))
            kind = rope.get("rope_type") or rope.get("type")
            if kind and kind != "default" and not raw.get("rope_scaling"):
                raw["rope_scaling"] = {"type": kind, "factor": rope.get("factor")}
        if raw.get("rope_scaling") and (raw["rope_scaling"].get("rope_type") or raw["rope_scaling"].get("type")) == "default":
            raw["rope_scaling"] = None
        if "id2label" in raw and "num_labels" not in raw:
            raw["num_labels"] = len(raw["id2label"])
        if raw.get("torch_dtype") is None and isinstance(raw.get("dtype"), str):
            raw["torch_dtype"] = raw["dtype"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known - _IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; remove them or check the file is a Persimmon config")
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "PersimmonConfig":
        """Read `path` (a config.json, or a directory holding one). Errors name the file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            raw = json.loads(read_regular(path, MAX_CONFIG_BYTES, "a config.json").decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found; a checkpoint directory needs a config.json") from None
        except OSError as e:  # unreadable (permissions), a directory, an I/O error
            raise ConfigError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        out = {"model_type": "persimmon", "architectures": ["PersimmonForCausalLM"]}
        out.update(dataclasses.asdict(self))
        return out

    def save(self, directory: str | os.PathLike) -> str:
        path = os.path.join(os.fspath(directory), "config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path
