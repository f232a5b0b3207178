"""`persimmon-export parity`: does a built artifact compute what the torch reference computes?

The backend runs greedy prefill + N decode steps on a batch of prompts; the fp32 torch reference
recomputes the same positions from the same tokens (teacher forcing, so one near-tie cannot
derail the comparison). Reported per backend: max abs logits difference (prefill and all
steps), top-1 agreement, and whether the backend's greedy tokens equal the reference's own
greedy generation. With `emulate`, the build's ONNX graph is also evaluated in true precision
on CPU (`emulate`: fp16 stored and computed in fp16, as a TensorRT engine does), which shows the
fp16 overflow that onnxruntime's CPU provider hides by computing in fp32.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from persimmon_runtime.backends import BACKENDS, decode, prefill
from persimmon_runtime.backends.step import parse_device
from persimmon_runtime.chat import format_chat
from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import CAUSAL_LM, Manifest, ModelShape
from persimmon_runtime.tokenizer import build_tokenizer

from ..config import PersimmonConfig
from ..load.checkpoint import check_directory, load_model
from ..progress import Steps
from ..reference.generate import greedy_generate
from .bounds import BOUNDS, KV_INT8, PREFILL_INT8, ParityResult
from .classify_parity import check_classifier_parity
from .emulate import DESCRIPTION, EmulatedBackend

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (format_chat("What is the capital of France?"), "The quick brown fox jumps over",
                   "東京は日本の首都です。 Emoji: 🎉")
def backend_greedy(backend, prompt_ids: list[list[int]], steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy prefill + `steps` decode steps: logits [steps+1, batch, vocab], tokens [batch, steps+1]."""
    logits, positions = prefill(backend, prompt_ids)
    all_logits, tokens = [logits], [logits.argmax(-1)]
    for _ in range(steps):
        logits = decode(backend, tokens[-1], positions)
        all_logits.append(logits)
        tokens.append(logits.argmax(-1))
    return np.stack(all_logits), np.stack(tokens, axis=1)


def _check_fits(manifest, prompt_ids: list[list[int]], decode_steps: int) -> None:
    """Prefill + decode must fit the build's batch and cache: say so before any step runs."""
    if len(prompt_ids) > manifest.max_batch:
        raise PersimmonError(f"{len(prompt_ids)} prompts, but the build's max_batch is {manifest.max_batch}; "
                             f"pass fewer --prompt values")
    longest = max(len(ids) for ids in prompt_ids)
    # the last decode step's token is written at slot longest + decode_steps - 1
    if longest + decode_steps > manifest.kv_capacity:
        raise PersimmonError(f"--steps {decode_steps}: the longest prompt ({longest} tokens) plus {decode_steps} "
                             f"decode steps exceeds the build's kv_capacity {manifest.kv_capacity}; use --steps "
                             f"<= {max(manifest.kv_capacity - longest, 0)} or shorter prompts")


def _check_checkpoint_fits(checkpoint: str, manifest: Manifest) -> None:
    """The checkpoint's config.json gives the build's model shape: else it is not where the build came from."""
    config = PersimmonConfig.from_file(check_directory(checkpoint))
    shape = ModelShape(config.vocab_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim)
    if shape != manifest.model:
        raise PersimmonError(f"{checkpoint}: its config.json describes {shape}, the build {manifest.model}: the "
                             f"build was not made from this checkpoint; pass the --checkpoint it was built from")


@torch.no_grad()
def check_parity(checkpoint: str, build_dir: str, prompts=DEFAULT_PROMPTS, decode_steps: int = 16,
                 backends=("onnxruntime",), device: str | None = None, max_abs: float | None = None,
                 min_top1: float | None = None, emulate: bool = False) -> list[ParityResult]:
    """One result per backend; with `emulate`, one more for the true-precision evaluation of the
    build's graph (see `emulate`), run on the prompts and steps of the backends."""
    if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < 0:
        raise PersimmonError(f"--steps must be a whole number >= 0, got {decode_steps!r}")
    if not (backends or emulate):
        raise PersimmonError("nothing to check: name a backend in --backend, or pass --emulate")
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        raise PersimmonError(f"--backend {unknown[0]!r} is unknown; choose from {', '.join(BACKENDS)}")
    if max_abs is not None and not (math.isfinite(max_abs) and max_abs >= 0):
        raise PersimmonError(f"--max-abs-diff must be a finite number >= 0, got {max_abs}")
    if min_top1 is not None and not 0 <= min_top1 <= 1:  # (NaN fails both comparisons)
        raise PersimmonError(f"--min-top1 must be in 0..1 (a share of positions), got {min_top1}")
    if device is not None:
        parse_device(device)  # a bad device is refused before anything else
    manifest = Manifest.load(build_dir)
    _check_checkpoint_fits(checkpoint, manifest)  # before the build runs and the reference loads
    if "tensorrt" in backends and manifest.tensorrt is None:
        raise PersimmonError(f"--backend tensorrt: {build_dir} has no TensorRT engine; check it with --backend "
                             f"onnxruntime, or build it with --backend tensorrt")
    if manifest.task != CAUSAL_LM:  # no decode steps: the classifier's logits per text
        return check_classifier_parity(checkpoint, build_dir, manifest, prompts, backends, max_abs, min_top1, emulate)
    if emulate and manifest.weights is not None:  # onnx's reference evaluator has no MatMulNBits
        raise PersimmonError(f"--emulate evaluates float graphs; {build_dir} has {manifest.weights.type} weights: "
                             f"check it without --emulate")
    prompt_ids = [build_tokenizer(build_dir, manifest).encode(p) for p in prompts]
    _check_fits(manifest, prompt_ids, decode_steps)
    reference = None  # (fp32 model, its own greedy tokens per prompt), made once, after a backend has run

    def compare(name: str, dtype: str, logits: np.ndarray, tokens: np.ndarray) -> ParityResult:
        nonlocal reference
        if reference is None:  # the slow part: only once the build has accepted the request
            model = load_model(checkpoint, dtype="float32")
            greedy = []
            with Steps(log, "reference greedy", len(prompt_ids), "prompts", every=1) as step:
                for ids in prompt_ids:
                    greedy.append(greedy_generate(model, torch.tensor([ids]), max_new_tokens=decode_steps + 1)
                                  [0, len(ids):].tolist())
                    step()
            reference = model, greedy
        return _compare(name, dtype, *reference, prompt_ids, logits, tokens, max_abs, min_top1)

    results = []
    for name in backends:
        generator = Generator.load(build_dir, backend=name, device=device)
        log.info(f"{name}: {len(prompt_ids)} prompts, prefill + {decode_steps} decode steps")
        logits, tokens = backend_greedy(generator.backend, prompt_ids, decode_steps)
        results.append(compare(name, precision(generator.manifest, generator.backend), logits, tokens))
    if emulate:
        backend = EmulatedBackend(build_dir)
        log.info(f"emulated: {len(prompt_ids)} prompts, prefill + {decode_steps} decode steps")
        logits, tokens = backend_greedy(backend, prompt_ids, decode_steps)
        result = compare(backend.name, backend.manifest.dtype, logits, tokens)
        finite = int(np.isfinite(logits).sum())
        result.note = (f"  emulated: the {backend.manifest.dtype} graph on CPU, {DESCRIPTION}; non-finite "
                       f"logits {logits.size - finite}/{logits.size}")
        results.append(result)
    return results


def precision(manifest: Manifest, backend=None) -> str:
    """'float16', 'float16/int4' for weight-only quantized builds, 'float32/int8-prefill' for a float
    build whose prompt steps ran on its int8 prefill graph (`backend`, after the run): what the
    bounds are chosen by."""
    if manifest.weights is not None:
        return f"{manifest.dtype}/{manifest.weights.type}"
    if getattr(backend, "prefill_steps", 0):
        return f"{manifest.dtype}/{PREFILL_INT8}"
    if manifest.cache_dtype != manifest.dtype:
        return f"{manifest.dtype}/{KV_INT8}"
    return manifest.dtype


def _compare(name: str, dtype: str, reference, reference_tokens: list[list[int]], prompt_ids: list[list[int]],
             logits: np.ndarray, tokens: np.ndarray, max_abs: float | None, min_top1: float | None) -> ParityResult:
    """A backend's greedy logits [steps+1, batch, vocab] and tokens against the fp32 reference (and
    `reference_tokens`, its own greedy generation from each prompt)."""
    decode_steps = len(logits) - 1
    diffs, prefill_diffs, agree, total, scale = [], [], 0, 0, 0.0
    greedy_identical = 0
    for row, ids in enumerate(prompt_ids):
        fed = torch.tensor([ids + tokens[row, :-1].tolist()])  # the backend's own tokens, teacher-forced
        expected = reference(fed)[0, len(ids) - 1:].numpy()  # [steps+1, vocab]
        got = logits[:, row]
        diff = np.abs(got - expected).max(-1)
        prefill_diffs.append(diff[0])
        diffs.append(diff.max())
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += len(diff)
        scale = max(scale, float(np.abs(expected).max()))
        greedy_identical += int(reference_tokens[row] == tokens[row].tolist())
    bound_spec = BOUNDS[dtype.rpartition("/")[2]]  # a quantized build: its weights' bounds
    bound = max_abs if max_abs is not None else bound_spec["max_abs"] * (scale if bound_spec["relative"] else 1.0)
    # np.max, not max(): a NaN difference (overflow) must not lose to a later finite one
    return ParityResult(name, dtype, decode_steps, float(np.max(prefill_diffs)), float(np.max(diffs)), bound,
                        agree / total, min_top1 if min_top1 is not None else bound_spec["top1"],
                        greedy_identical, len(prompt_ids), bound_spec["greedy_must_match"])
