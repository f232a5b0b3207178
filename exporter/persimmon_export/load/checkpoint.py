"""Hugging Face checkpoint directories: read tensor by tensor, write in safetensors shards.

Reading never holds more than the model plus one tensor: the model is built on the meta device
and each tensor is read (memory-mapped), cast and assigned in turn.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.regular_files import check_regular
from persimmon_runtime.tokenizer import Tokenizer

from ..config import PersimmonConfig
from ..files import atomic_directory
from ..progress import Steps
from ..reference.model import PersimmonForCausalLM
from . import safe_pickle

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# What a head model does not use from a causal LM checkpoint (and vice versa for loading a base).
_OTHER_HEADS = ("lm_head.", "score.")


class CheckpointError(PersimmonError):
    pass


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def weight_files(directory: str) -> list[str]:
    """The weight files of a checkpoint directory, in the order the index lists them."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(directory, index_name)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid shard index ({e!r})") from None
            files = list(dict.fromkeys(weight_map.values()))
            for name in files:
                if not os.path.exists(os.path.join(directory, name)):
                    raise CheckpointError(f"{index_path}: lists shard {name!r}, which is missing from {directory}")
            return [os.path.join(directory, name) for name in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
    raise CheckpointError(
        f"{directory}: no weights found; expected model.safetensors, pytorch_model.bin or their "
        f".index.json with shards")


def iter_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, read one at a time."""
    try:  # safetensors reports an unreadable file as "No such file or directory": open it ourselves first
        check_regular(path, "a weights file")  # (a FIFO would hang the load, /dev/urandom mislead it)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    if path.endswith(".safetensors"):
        if not _is_utf8(path):
            raise CheckpointError(f"{path}: the safetensors library opens only UTF-8 paths; rename the directory "
                                  f"(or file) to a UTF-8 name")
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e}); it may be truncated - "
                                  f"copy or download it again") from None
        return
    state = safe_pickle.load(path, foreign_classes=False, error=CheckpointError)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    for name, tensor in state.items():
        if not (isinstance(name, str) and isinstance(tensor, torch.Tensor)):
            raise CheckpointError(f"{path}: entry {name!r:.80} holds a {type(tensor).__name__}, not a tensor")
    yield from state.items()


def _is_utf8(path: str) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def checkpoint_dtype(directory: str) -> torch.dtype:
    """The dtype of the first floating-point tensor on disk."""
    for path in weight_files(directory):
        for _, tensor in iter_tensors(path):
            if tensor.is_floating_point():
                return tensor.dtype
    raise CheckpointError(f"{directory}: no floating-point tensors found")


def checked_tensors(directory: str, config: PersimmonConfig, model_class=PersimmonForCausalLM
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors `model_class` needs, read one at a time and checked against config.json.

    Unexpected or misshapen tensors raise CheckpointError naming the file and tensor; missing
    ones raise once the last file is read. Tensors of another head or recomputed buffers are
    skipped.
    """
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    for path in weight_files(directory):
        for name, tensor in iter_tensors(path):
            if name.endswith(_IGNORED_SUFFIXES) or (name not in expected and name.startswith(_OTHER_HEADS)):
                continue
            if name not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {name!r}; is this a Persimmon checkpoint "
                                      f"matching its config.json?")
            want = expected.pop(name)
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json "
                                      f"implies {want}")
            yield name, tensor
    if expected:
        names = sorted(expected)
        raise CheckpointError(f"{directory}: {len(names)} tensor(s) missing from the weights, e.g. {names[:3]}")


def load_model(directory: str, dtype: str | torch.dtype | None = None, model_class=PersimmonForCausalLM,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a checkpoint directory into `model_class`, in eval mode.

    dtype None keeps the dtype stored on disk (never a silent fp32 -> fp16).
    """
    directory = check_directory(directory)
    config = PersimmonConfig.from_file(directory)
    dtype = parse_dtype(dtype) or checkpoint_dtype(directory)
    with torch.device("meta"):
        model = model_class(config)
    # the reference load of calibration and parity: minutes at 8B, so it shows progress
    tensors = len(model.state_dict()) - (1 if config.tie_word_embeddings and hasattr(model, "lm_head") else 0)
    log.info(f"loading {directory} as {str(dtype).removeprefix('torch.')} ({model_class.__name__}) ...")
    with Steps(log, "loading", tensors, "tensors", every=max(1, tensors // 10)) as step:
        for name, tensor in checked_tensors(directory, config, model_class):
            target = dtype if tensor.is_floating_point() else tensor.dtype
            _assign(model, name, tensor.to(device=device, dtype=target, copy=True))
            step()
    if config.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def check_directory(directory) -> str:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory; pass a Hugging Face checkpoint directory")
    if not os.access(directory, os.R_OK | os.X_OK):
        # without this, every file inside looks missing and the error would say "not found"
        raise CheckpointError(f"{directory}: permission denied; make the checkpoint directory readable")
    return directory


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)


def save_checkpoint(tensors: Iterable[tuple[str, torch.Tensor]], config: PersimmonConfig, out_dir: str,
                    max_shard_bytes: int = 5 * 2**30, extra_files: dict[str, str | bytes] | None = None,
                    overwrite: bool = False, inputs=()) -> str:
    """Write an HF checkpoint directory: config.json, safetensors shards (+ index), extra files.

    `tensors` may be a generator: a shard is written as soon as it is full, so memory stays at
    about one shard. The directory appears complete or not at all (temp dir, then rename).
    `extra_files` maps a file name in out_dir to a source path to copy, or to its bytes.
    An existing `out_dir` is replaced only if it is a checkpoint we wrote and `overwrite` is set;
    it may not be, hold or lie inside `inputs` or an extra file's source (see `files.check_output`).
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise CheckpointError(f"max shard size must be a positive number of bytes, got {max_shard_bytes!r}")
    sources = [source for source in (extra_files or {}).values() if not isinstance(source, bytes)]
    with atomic_directory(out_dir, "checkpoint", overwrite=overwrite, inputs=(*inputs, *sources)) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_bytes = 0
        written: list[tuple[str, list[str]]] = []

        def flush():
            name = f"model-{len(written) + 1:05d}.safetensors"
            try:
                save_file({k: v.contiguous() for k, v in shards[-1].items()}, os.path.join(tmp, name),
                          metadata={"format": "pt"})
            except SafetensorError as e:  # wraps the OSError (disk full, file too large) in its message
                raise CheckpointError(f"{os.path.join(out_dir, name)}: cannot write ({e}); free some space or "
                                      f"choose another --out") from None
            written.append((name, list(shards[-1])))
            shards[-1] = {}

        total = 0
        for name, tensor in tensors:
            size = tensor.numel() * tensor.element_size()
            if shards[-1] and shard_bytes + size > max_shard_bytes:
                flush()
                shard_bytes = 0
            shards[-1][name] = tensor
            shard_bytes += size
            total += size
        if shards[-1] or not written:
            flush()
        _name_shards(tmp, written, total)
        config.save(tmp)
        for name, source in (extra_files or {}).items():
            if isinstance(source, bytes):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(source)
            else:
                shutil.copyfile(source, os.path.join(tmp, name))
    return os.path.abspath(out_dir)


def _name_shards(tmp: str, written: list[tuple[str, list[str]]], total_bytes: int) -> None:
    """HF naming: one file is model.safetensors; several are model-0000i-of-0000n + an index."""
    if len(written) == 1:
        os.rename(os.path.join(tmp, written[0][0]), os.path.join(tmp, "model.safetensors"))
        return
    weight_map = {}
    for i, (name, keys) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.rename(os.path.join(tmp, name), os.path.join(tmp, final))
        weight_map.update(dict.fromkeys(keys, final))
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)


def save_model(model: torch.nn.Module, out_dir: str, dtype: str | torch.dtype | None = None,
               extra_files: dict[str, str | bytes] | None = None, max_shard_bytes: int = 5 * 2**30,
               overwrite: bool = False) -> str:
    """Save a reference model as an HF checkpoint directory (optionally cast to `dtype`)."""
    dtype = parse_dtype(dtype)
    config = model.config
    tensors = ((name, t.detach().to(dtype) if dtype and t.is_floating_point() else t.detach())
               for name, t in model.state_dict().items()
               if not (config.tie_word_embeddings and name == "lm_head.weight"))
    stored = dtype or next(model.parameters()).dtype
    saved_config = PersimmonConfig(**{**config.__dict__, "torch_dtype": str(stored).removeprefix("torch.")})
    return save_checkpoint(tensors, saved_config, out_dir, max_shard_bytes=max_shard_bytes, extra_files=extra_files,
                           overwrite=overwrite)


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    """HF tokenizer_config.json for LlamaTokenizer with Persimmon's settings."""
    return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": tokenizer.bos_token, "eos_token": None, "pad_token": None, "unk_token": "<unk>",
            "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384}


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, str | bytes]:
    """The tokenizer files of an HF checkpoint directory (see `save_checkpoint`'s extra_files)."""
    settings = tokenizer_config(tokenizer)
    special = {"bos_token": settings["bos_token"], "unk_token": settings["unk_token"]}
    return {"tokenizer.model": tokenizer.model_file,
            "tokenizer_config.json": json.dumps(settings, indent=2).encode(),
            "special_tokens_map.json": json.dumps(special, indent=2).encode()}
