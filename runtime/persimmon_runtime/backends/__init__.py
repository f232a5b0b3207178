"""Backends run one model step over the KV cache; everything else (sampling, streaming,
batching) is shared and lives in `generator`.

A backend has `manifest`, `name`, `max_step_tokens` (the most new tokens per row in one step),
`start(batch)` (zeroed caches for `batch` rows) and
`step(input_ids, first_slot, token_count, attention_mask, first_row=0) -> fp32 logits [rows, vocab]`,
with the inputs as described in the manifest (int64 numpy arrays; `first_slot[r]` is the cache
slot of row r's first new token, i.e. how many tokens the row has cached). A step runs on the
cache rows first_row .. first_row + rows - 1 of the started batch and leaves the others alone: the
caches are [batch, heads, slots, head_dim], so any run of rows is one contiguous block, bound as
it is (no copy). That lets a scheduler prefill a newcomer's row alone, without computing padding
for every other row. Every backend's `step` first calls `step.check_step`: the graphs do not bound-check
their cache writes.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import numpy as np

from ..cpu import check_prefill_choice
from ..errors import PersimmonError
from ..manifest import CAUSAL_LM, EngineSection, Manifest
from .step import parse_device

BACKENDS = ("onnxruntime", "tensorrt")
BACKEND_CHOICES = ("auto", *BACKENDS)  # what load_backend, persimmon-run and the Triton model take


@runtime_checkable
class Backend(Protocol):
    """What the scheduler, the Generator and parity use of a backend (both backends satisfy it;
    tests/test_prefill_graph.py checks)."""
    manifest: Manifest
    name: str               # a BACKENDS entry
    prefill_kernels: str    # what runs prompt steps, and why (persimmon_runtime.cpu.choose_prefill)

    @property
    def max_step_tokens(self) -> int: ...

    def start(self, batch: int) -> None: ...

    def step(self, input_ids: np.ndarray, first_slot: np.ndarray, token_count: np.ndarray,
             attention_mask: np.ndarray, first_row: int = 0) -> np.ndarray: ...


def load_backend(build_dir: str, manifest: Manifest, backend: str = "auto", device: str | None = None,
                 prefill: str = "auto") -> Backend:
    """`auto` picks TensorRT when the build has an engine and this machine can run it (the engine's
    TensorRT or TensorRT-RTX imports, and the GPU is one it was built for), else onnxruntime.

    device None means the backend's default: "cuda" for TensorRT, "cpu" for onnxruntime. prefill
    ("auto", "int8", "off"): whether onnxruntime runs prompt steps on the build's int8 prefill
    graph (see `persimmon_runtime.cpu.choose_prefill`); the backend's `prefill_kernels` says.
    """
    if device is not None:
        parse_device(device)  # refused here, before any backend is chosen or imported
    check_prefill_choice(prefill)
    if manifest.task != CAUSAL_LM:  # no step graph, no cache: nothing here can run it
        raise PersimmonError(f"{build_dir} is a {manifest.task} build, not a causal LM: open it with "
                             f"persimmon_runtime.Classifier.load")
    if backend == "auto":
        backend = "tensorrt" if manifest.tensorrt and device != "cpu" and _engine_usable(manifest.tensorrt) \
            else "onnxruntime"
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(build_dir, manifest, device=device or "cpu", prefill=prefill)
    if backend == "tensorrt":
        from .tensorrt import TensorRTBackend

        if prefill == "int8":
            raise PersimmonError("prefill 'int8' is for onnxruntime on CPUs; the TensorRT engine prefills with its "
                                 "own profile: use prefill 'auto' or 'off'")
        return TensorRTBackend(build_dir, manifest, device=device or "cuda")
    raise PersimmonError(f"backend {backend!r} is unknown; choose one of {BACKEND_CHOICES}")


def _engine_usable(section: EngineSection) -> bool:
    """The engine's TensorRT (or TensorRT-RTX) imports and a GPU it was built for is present."""
    try:
        from .tensorrt import engine_runtime
        from .cuda import check, compute_capability, cudart

        importlib.import_module(engine_runtime(section)[0])
        if check(cudart().cudaGetDeviceCount()) < 1:
            return False
    except Exception:
        return False
    targets = section.compute_capabilities
    return not targets or compute_capability() in targets


def prefill(backend, prompt_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Start `backend` on a batch of prompts: one step, right-padded, every row from slot 0.

    Returns the logits of each prompt's last token and each row's next cache slot. (The
    Generator's scheduler prefills in chunks instead; see `scheduler`.)
    """
    lengths = np.array([len(ids) for ids in prompt_ids], np.int64)
    input_ids = np.zeros((len(prompt_ids), int(lengths.max())), np.int64)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, :len(ids)] = ids
    backend.start(len(prompt_ids))
    # Padding slots past a row's length get junk keys, but they lie ahead of the row's queries
    # (causally masked) and are overwritten by its next tokens.
    logits = backend.step(input_ids, np.zeros(len(prompt_ids), np.int64), lengths, np.ones_like(input_ids))
    return logits, lengths


def decode(backend, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One token per row, written at `positions` (advanced in place); returns the next logits."""
    batch = len(tokens)
    attention_mask = np.ones((batch, int(positions.max()) + 1), np.int64)  # width = slots in use
    logits = backend.step(np.asarray(tokens, np.int64)[:, None], positions, np.ones(batch, np.int64), attention_mask)
    positions += 1
    return logits
