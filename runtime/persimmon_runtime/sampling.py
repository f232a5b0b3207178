"""Choosing the next token from fp32 logits (numpy; Hugging Face semantics for each knob)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PersimmonError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(field, value, rule):
            raise PersimmonError(f"{field}={value!r}: {rule}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            bad("temperature", self.temperature, "must be a finite number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1] (1 = off)")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty < float("inf"):
            bad("repetition_penalty", self.repetition_penalty, "must be a finite number > 0 (1 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", self.seed, "must be a non-negative integer or None")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            bad("stop", self.stop, "must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", stop)


class Sampler:
    """One per sequence: holds its random stream, so a seed reproduces the same tokens."""

    def __init__(self, params: SamplingParams, row: int = 0):
        self.params = params
        self.rng = np.random.default_rng(None if params.seed is None else [params.seed, row])

    def process(self, logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        """Logits after repetition penalty, temperature, top-k and top-p (filtered entries -inf)."""
        p = self.params
        logits = logits.astype(np.float32, copy=True)
        if p.repetition_penalty != 1.0 and len(history):
            seen = np.unique(history)
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.temperature == 0:
            return logits
        logits /= p.temperature
        if 0 < p.top_k < logits.shape[0]:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        if p.top_p < 1.0:
            order = np.argsort(-logits, kind="stable")
            probs = _softmax(logits[order])
            # keep the smallest prefix whose mass reaches top_p (at least one token)
            cut = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            logits[order[cut:]] = -np.inf
        return logits

    def __call__(self, logits: np.ndarray, history: np.ndarray) -> int:
        """The next token. logits: fp32 [vocab]; history: the sequence's ids so far, prompt included."""
        processed = self.process(logits, history)
        if self.params.temperature == 0:
            return int(np.argmax(processed))
        return int(self.rng.choice(processed.shape[0], p=_softmax(processed)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - np.max(logits))
    return shifted / shifted.sum()
