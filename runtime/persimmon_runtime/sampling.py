"""Choosing the next token from fp32 logits (numpy; Hugging Face semantics for each knob)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import numpy as np

from .errors import PersimmonError, brief

# Stop strings are markers (a role tag, a delimiter): TGI and OpenAI allow 4. 16 leaves room for
# several chat roles; with at most 256 characters each, matching costs at most 16 short scans per
# token, and a stream withholds at most 255 characters while they might still be a stop.
MAX_STOPS = 16
MAX_STOP_CHARS = 256

_LARGEST = np.finfo(np.float64).max


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

    @classmethod
    def from_settings(cls, settings: dict) -> "SamplingParams":
        """Keyword settings from a caller; an unknown name is a PersimmonError, not a TypeError."""
        known = [f.name for f in fields(cls)]
        unknown = [name for name in settings if name not in known]
        if unknown:
            raise PersimmonError(f"unknown sampling setting {unknown[0]!r}; known: {', '.join(known)}")
        return cls(**settings)

    def __post_init__(self):
        def bad(field, value, rule):
            raise PersimmonError(f"{field}={brief(value)}: {rule}")

        def number(field, valid, rule, integer=False):
            """Store the field as a plain int/float (from numpy scalars, Fractions...) if valid(), else bad()."""
            value = getattr(self, field)
            plain = None
            if isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool):
                try:
                    plain = int(value) if integer else float(value)
                except OverflowError:  # an int too large for a float
                    pass
            if plain is None or not valid(plain):
                bad(field, value, rule)
            object.__setattr__(self, field, plain)

        inf = float("inf")
        number("max_new_tokens", lambda v: v >= 1, "must be an integer >= 1", integer=True)
        number("temperature", lambda v: 0 <= v < inf, "must be a finite number >= 0 (0 = greedy)")
        number("top_k", lambda v: v >= 0, "must be an integer >= 0 (0 = off)", integer=True)
        number("top_p", lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)")
        number("repetition_penalty", lambda v: 0 < v < inf, "must be a finite number > 0 (1 = off)")
        if self.seed is not None:
            number("seed", lambda v: v >= 0, "must be a non-negative integer or None", integer=True)
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", self.ignore_eos, "must be True or False")
        object.__setattr__(self, "stop", _stop_strings(self.stop))



def _stop_strings(stop) -> tuple[str, ...]:
    stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise PersimmonError(f"stop={brief(stop)}: must be a non-empty string or a list of them")
    if len(stops) > MAX_STOPS:
        raise PersimmonError(f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed")
    too_long = next((s for s in stops if len(s) > MAX_STOP_CHARS), None)
    if too_long is not None:
        raise PersimmonError(f"stop string {brief(too_long)} has {len(too_long)} characters; "
                             f"at most {MAX_STOP_CHARS} are allowed")
    return tuple(stops)


class Sampler:
    """One per sequence: holds its random stream, so a seed reproduces the same tokens.

    Logits must be finite (the generator checks each row before sampling). The arithmetic is
    float64 and saturates instead of overflowing, so any valid setting gives a valid distribution:
    temperature 1e-40 acts as greedy, repetition_penalty 1e-40 as an overwhelming preference.
    """

    def __init__(self, params: SamplingParams, row: int = 0):
        self.params = params
        self.rng = np.random.default_rng(None if params.seed is None else [params.seed, row])

    def process(self, logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        """Logits (float64) after repetition penalty, temperature, top-k and top-p (filtered entries -inf)."""
        p = self.params
        logits = logits.astype(np.float64)
        if p.repetition_penalty != 1.0 and len(history):
            _penalize(logits, np.unique(history), p.repetition_penalty)
        if p.temperature == 0:
            return logits
        logits = _divide(logits, p.temperature)
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

    @property
    def reads_history(self) -> bool:
        """Only the repetition penalty looks at the ids so far (callers may skip building them)."""
        return self.params.repetition_penalty != 1.0

    def __call__(self, logits: np.ndarray, history: np.ndarray) -> int:
        """The next token. logits: fp32 [vocab]; history: the sequence's ids so far, prompt included."""
        p = self.params
        if p.temperature == 0 and p.repetition_penalty == 1.0:
            return int(np.argmax(logits))  # plain greedy: nothing to transform, so no copy
        processed = self.process(logits, history)
        if p.temperature == 0:
            return int(np.argmax(processed))
        return int(self.rng.choice(processed.shape[0], p=_softmax(processed)))


def _penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """HF's repetition penalty on the `seen` ids, in place. A tiny penalty would overflow a
    positive logit to inf (and inf - inf is NaN in the softmax): saturate at the largest float."""
    values = logits[seen]
    with np.errstate(over="ignore"):
        penalized = np.where(values > 0, values / penalty, values * penalty)
    logits[seen] = np.clip(penalized, -_LARGEST, _LARGEST)


def _divide(logits: np.ndarray, temperature: float) -> np.ndarray:
    """logits / temperature. When a tiny temperature overflows that, divide each logit's distance
    from the best one instead: the softmax is the same, the best stays at exactly 0 and the rest
    go to -inf, so the distribution stays defined (greedy in the limit)."""
    with np.errstate(over="ignore"):
        scaled = logits / temperature
        if np.isfinite(scaled.max()):
            return scaled
        return (logits - logits.max()) / temperature


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - np.max(logits))
    return shifted / shifted.sum()
