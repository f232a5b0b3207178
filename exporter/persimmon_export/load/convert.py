"""Convert an original adept-inference (Megatron) checkpoint into a Hugging Face directory.

The checkpoint (`iter_*/mp_rank_00/model_optim_rng.pt`) pickles adept-inference classes next to
the tensors. Instead of putting that source on the path, `safe_pickle.load` has torch's
weights_only unpickler build the tensors and turn every other class into an inert placeholder:
nothing from the file is executed, and nothing outside an exact allow-list is imported.
"""

from __future__ import annotations

import logging
import math
import os
import re
import types

import torch

from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.tokenizer import DEFAULT_BOS, Tokenizer

from ..config import PersimmonConfig
from ..files import check_output
from ..progress import Steps
from .checkpoint import parse_dtype, save_checkpoint, tokenizer_files
from .safe_pickle import load as safe_load

log = logging.getLogger(__name__)

_RENAMES = (  # the upstream converter's renames, applied in order to the flattened key
    ("language_model.encoder", "model"),
    ("language_model.embedding.word_embeddings", "model.embed_tokens"),
    ("language_model.output_layer", "lm_head"),
    ("word_embeddings_for_head", "lm_head"),
    ("self_attention", "self_attn"),
)
_INV_FREQ = "rotary_emb.inv_freq"
# The fields of Megatron's args that infer_config reads, and what each must be.
_ARGS_FIELDS = {"num_attention_heads": int, "max_position_embeddings": int, "seq_length": int,
                "layernorm_epsilon": float}


class ConvertError(PersimmonError):
    pass


def find_megatron_file(path: str) -> str:
    """A model_optim_rng.pt file, or the newest iteration under a Megatron checkpoint directory."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ConvertError(f"{path}: no such file or directory")
    if os.path.basename(path).startswith("iter_") or os.path.exists(os.path.join(path, "mp_rank_00")):
        candidate = os.path.join(path, "mp_rank_00", "model_optim_rng.pt")
    else:
        iterations = sorted(d for d in os.listdir(path) if re.fullmatch(r"iter_\d+", d))
        if not iterations:
            raise ConvertError(f"{path}: no iter_*/mp_rank_00/model_optim_rng.pt found; pass the checkpoint "
                               f"directory or the .pt file")
        candidate = os.path.join(path, iterations[-1], "mp_rank_00", "model_optim_rng.pt")
    if not os.path.isfile(candidate):
        raise ConvertError(f"{candidate}: not found; only tensor-parallel size 1 (mp_rank_00) is supported")
    return candidate


def load_megatron(path: str) -> dict:
    """Unpickle a Megatron checkpoint file without its source code (memory-mapped when possible).

    `ckpt["args"]` becomes a namespace of the validated `_ARGS_FIELDS` the file has.
    """
    ckpt = safe_load(path, foreign_classes=True, error=ConvertError)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ConvertError(f"{path}: no 'model' dict inside; is this an adept-inference model_optim_rng.pt?")
    ckpt["args"] = _checked_args(path, ckpt.get("args"))
    return ckpt


def _checked_args(path: str, args) -> types.SimpleNamespace:
    """The args fields we use, each a positive finite number of its type (the file chooses their values)."""
    checked = types.SimpleNamespace()
    for field, kind in _ARGS_FIELDS.items():
        value = getattr(args, field, None)
        if value is None:
            continue
        is_int = isinstance(value, int) and not isinstance(value, bool) and value < 2**31
        is_float = isinstance(value, float) and math.isfinite(value)
        if not ((is_int or (kind is float and is_float)) and value > 0):
            raise ConvertError(f"{path}: args.{field} is {value!r:.80}, not a positive "
                               f"{'integer' if kind is int else 'number'}; is this an adept-inference checkpoint?")
        setattr(checked, field, kind(value))
    return checked


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        elif isinstance(value, torch.Tensor):
            yield name, value


def hf_tensors(megatron_model: dict) -> dict[str, torch.Tensor]:
    """Flattened, renamed tensors (HF names), including the rotary inv_freq buffers."""
    out = {}
    for name, tensor in _flatten(megatron_model):
        for old, new in _RENAMES:
            name = name.replace(old, new)
        out[name] = tensor
    return out


def infer_config(tensors: dict[str, torch.Tensor], args=None, tokenizer: Tokenizer | None = None,
                 source: str = "checkpoint") -> PersimmonConfig:
    """The model's shape from its tensors; rotary dims and theta from the stored inv_freq."""
    def need(name, ndim):
        if name not in tensors:
            raise ConvertError(f"{source}: tensor {name!r} not found; is this a Persimmon checkpoint?")
        shape = tuple(tensors[name].shape)
        if len(shape) != ndim or 0 in shape:
            raise ConvertError(f"{source}: tensor {name!r} has shape {shape}; a Persimmon checkpoint has a "
                               f"non-empty {ndim}-D tensor there")
        return tensors[name]

    vocab_size, hidden_size = need("model.embed_tokens.weight", 2).shape
    layers = {int(m.group(1)) for n in tensors if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ConvertError(f"{source}: layer indices {sorted(layers)[:5]}... are not 0..n-1")
    qk_layernorm = "model.layers.0.self_attn.q_layernorm.weight" in tensors
    heads = getattr(args, "num_attention_heads", None)
    if qk_layernorm:
        head_dim = need("model.layers.0.self_attn.q_layernorm.weight", 1).shape[0]
        if hidden_size % head_dim:
            raise ConvertError(f"{source}: q_layernorm has {head_dim} entries, which does not divide the hidden "
                               f"size {hidden_size}; the checkpoint is inconsistent")
        heads = hidden_size // head_dim
    if not heads:
        raise ConvertError(f"{source}: cannot tell the number of heads (no q_layernorm, no args)")
    if hidden_size % heads:
        raise ConvertError(f"{source}: args.num_attention_heads {heads} does not divide the hidden size {hidden_size}")
    head_dim = hidden_size // heads
    fields = dict(rope_theta=25000.0, partial_rotary_factor=0.5)
    inv_freq = tensors.get(f"model.layers.0.self_attn.{_INV_FREQ}")
    if inv_freq is not None:
        rotary_dims = 2 * inv_freq.numel()
        fields["partial_rotary_factor"] = rotary_dims / head_dim
        if inv_freq.numel() > 1:  # inv_freq[1] = theta ** (-2 / rotary_dims)
            theta = float(inv_freq[1].double()) ** (-rotary_dims / 2)
            fields["rope_theta"] = float(f"{theta:.6g}")
    special = tokenizer.bos_id if tokenizer is not None and tokenizer.bos_id is not None else None
    config = PersimmonConfig(
        vocab_size=int(vocab_size), hidden_size=int(hidden_size),
        intermediate_size=int(need("model.layers.0.mlp.dense_h_to_4h.weight", 2).shape[0]),
        num_hidden_layers=len(layers), num_attention_heads=int(heads), qk_layernorm=qk_layernorm,
        max_position_embeddings=int(getattr(args, "max_position_embeddings", None)
                                    or getattr(args, "seq_length", None) or 16384),
        layer_norm_eps=float(getattr(args, "layernorm_epsilon", None) or 1e-5),
        tie_word_embeddings="lm_head.weight" not in tensors,
        bos_token_id=special if special is not None else 1,
        eos_token_id=special if special is not None else 2,
        **fields)
    if inv_freq is not None and config.rotary_dims != 2 * inv_freq.numel():
        raise ConvertError(f"{source}: rotary_emb.inv_freq has {inv_freq.numel()} entries, which no "
                           f"partial_rotary_factor of head_dim {head_dim} reproduces")
    return config


def convert_megatron(source: str, out_dir: str, tokenizer_file: str | None = None, dtype: str | None = None,
                     max_shard_bytes: int = 2 * 2**30, overwrite: bool = False) -> str:
    """adept-inference checkpoint -> HF directory (config.json, safetensors, tokenizer files).

    An existing `out_dir` is replaced only if it is a checkpoint we wrote and `overwrite` is set.
    """
    path = find_megatron_file(source)
    if tokenizer_file is None:  # adept ships adept_vocab.model next to the iter_* folders
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
        tokenizer_file = os.path.join(root, "adept_vocab.model")
        if not os.path.isfile(tokenizer_file):
            raise ConvertError(f"{tokenizer_file}: not found; pass --tokenizer PATH/TO/adept_vocab.model")
    inputs = (source, path, tokenizer_file)
    check_output(out_dir, "checkpoint", overwrite, inputs)  # refuse before the slow read, not after
    tokenizer = Tokenizer(tokenizer_file, bos_token=DEFAULT_BOS)
    log.info(f"reading {path}")
    ckpt = load_megatron(path)
    tensors = hf_tensors(ckpt["model"])
    config = infer_config(tensors, ckpt.get("args"), tokenizer, source=path)
    if config.vocab_size < tokenizer.vocab_size:
        raise ConvertError(f"{tokenizer_file}: {tokenizer.vocab_size} pieces, more than the model's "
                           f"{config.vocab_size} embeddings; is it the right tokenizer?")
    target = parse_dtype(dtype)
    stored = next(t for t in tensors.values() if t.is_floating_point()).dtype
    config.torch_dtype = str(target or stored).removeprefix("torch.")
    names = [n for n in tensors if not n.endswith(_INV_FREQ)]
    log.info(f"writing {len(names)} tensors ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
             f"{config.torch_dtype}) to {out_dir}")

    def stream():
        with Steps(log, "converting", len(names), "tensors", every=50) as step:
            for name in names:
                t = tensors[name]
                yield name, t.to(target) if target is not None and t.is_floating_point() else t
                step()

    return save_checkpoint(stream(), config, out_dir, max_shard_bytes=max_shard_bytes,
                           extra_files=tokenizer_files(tokenizer), overwrite=overwrite, inputs=inputs)
