"""Choosing the next token from fp32 logits (numpy; Hugging Face semantics for each knob)."""

from __future__ import annotations

import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor
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

    Logits must be finite (the generator checks each row before sampling). Scores are float64
    and saturate instead of overflowing, so any valid setting gives a valid distribution:
    temperature 1e-40 acts as greedy, repetition_penalty 1e-40 as an overwhelming preference.
    Probabilities are float32 with float64 sums (see _unnormalised).
    """

    def __init__(self, params: SamplingParams, prompt_index: int = 0):
        """prompt_index: the prompt's place in its request; with a seed, each prompt gets its own stream."""
        self.params = params
        self.rng = np.random.default_rng(None if params.seed is None else [params.seed, prompt_index])

    def process(self, logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        """Logits (float64) after repetition penalty, temperature, top-k and top-p (filtered entries -inf)."""
        scores = self._scores(logits, history)
        kept = None if self.params.temperature == 0 else self._kept(scores)[0]
        if kept is None:
            return scores.copy()  # a private copy: scores is this thread's work array
        processed = np.full_like(scores, -np.inf)
        processed[kept] = scores[kept]
        return processed

    @property
    def reads_history(self) -> bool:
        """Only the repetition penalty looks at the ids so far (callers may skip building them)."""
        return self.params.repetition_penalty != 1.0

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing to transform: the token is the argmax of the raw logits."""
        return self.params.temperature == 0 and self.params.repetition_penalty == 1.0

    def __call__(self, logits: np.ndarray, history: np.ndarray) -> int:
        """The next token. logits: fp32 [vocab]; history: the sequence's ids so far, prompt included."""
        return int(sample(logits[None], [self], [history])[0])

    def _next_token(self, logits: np.ndarray, history: np.ndarray) -> int:
        """One row's token; draws exactly one uniform from this sampler's rng unless it is greedy."""
        scores = self._scores(logits, history)
        if self.params.temperature == 0:
            return int(np.argmax(scores))
        kept, probs = self._kept(scores)
        position = _categorical(probs, self.rng)
        return position if kept is None else int(kept[position])

    def _scores(self, logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        """float64 logits after the repetition penalty and then the temperature (HF's order), in
        this thread's work array."""
        p = self.params
        scores = _work_array("scores", logits.shape[0], np.float64)
        scores[...] = logits
        if p.repetition_penalty != 1.0 and len(history):
            _penalize(scores, np.unique(history), p.repetition_penalty)
        return scores if p.temperature == 0 else _divide(scores, p.temperature)

    def _kept(self, scores: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Top-k then top-p on temperature-scaled scores: (kept ids or None for all of them, their
        unnormalised probabilities, in the same order)."""
        p = self.params
        kept = None
        candidates = scores
        if 0 < p.top_k < scores.shape[0]:
            kept = _top_k(scores, p.top_k)
            candidates = scores[kept]
        if p.top_p < 1.0:
            inside, probs = _nucleus(candidates, p.top_p)
            return (inside if kept is None else kept[inside]), probs
        return kept, _unnormalised(candidates)


def sample(logits: np.ndarray, samplers: list[Sampler], histories: list[np.ndarray]) -> np.ndarray:
    """The next token of every row: int64 [rows].

    logits: finite [rows, vocab]; samplers[i] and histories[i] (ids so far, prompt included; may be
    empty when the sampler does not read it) belong to row i. A row's token depends only on its own
    logits, sampler and history: each sampling row draws exactly one number from its own rng, so a
    seeded request gives the same tokens alone or batched with any others, in any order.
    """
    if logits.ndim != 2 or len(samplers) != logits.shape[0] or len(histories) != logits.shape[0]:
        raise PersimmonError(f"sample() got logits of shape {logits.shape} with {len(samplers)} samplers and "
                             f"{len(histories)} histories: pass [rows, vocab] logits and one of each per row")
    tokens = np.empty(len(samplers), np.int64)
    plain = [row for row, sampler in enumerate(samplers) if sampler.is_plain_greedy]
    if plain:
        # One argmax over every row (about 20 us a row at vocab 262,144) costs less than copying
        # the greedy rows out of the batch.
        tokens[plain] = np.argmax(logits, axis=1)[plain]
    # The other rows go one by one: their work is full-row passes whose cost per element is the
    # same stacked or not (measured at 8 rows: one argpartition over the stacked rows 4.8 ms, 8
    # separate ones 3.7 ms; the copy-scale-exp passes no faster stacked), and each row needs its
    # own rng anyway. Several such rows run on a thread pool: numpy releases the GIL in those
    # passes, and at 8 rows they cost more than a GPU decode step when run in turn
    # (benchmarks/results/gpu_decode_step.json).
    rows = [row for row, sampler in enumerate(samplers) if not sampler.is_plain_greedy]

    def next_token(row: int) -> int:
        return samplers[row]._next_token(logits[row], histories[row])

    pool = _row_pool() if len(rows) > 1 else None
    for row, token in zip(rows, pool.map(next_token, rows) if pool else map(next_token, rows)):
        tokens[row] = token
    return tokens


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _row_pool() -> ThreadPoolExecutor | None:
    """The threads that sample rows side by side (None on one core)."""
    global _pool
    workers = min(8, os.cpu_count() or 1)
    if workers < 2:
        return None
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="persimmon-sampling")
        return _pool


_work = threading.local()


def _work_array(name: str, size: int, dtype) -> np.ndarray:
    """This thread's reusable array `name` (one dtype per name). Fresh 1-2 MB arrays for every
    token cost their page faults every time: measured on the 2-core VM of docs/benchmarks.md, the
    top-p step at vocab 262,144 took about 1000 faults and 8.9 ms a row with them, 2.5 ms with these."""
    array = getattr(_work, name, None)
    if array is None or array.shape[0] < size:
        array = np.empty(size, dtype)
        setattr(_work, name, array)
    return array[:size]


def _penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """HF's repetition penalty on the `seen` ids, in place. A tiny penalty would overflow a
    positive logit to inf (and inf - inf is NaN in the softmax): saturate at the largest float."""
    values = logits[seen]
    with np.errstate(over="ignore"):
        penalized = np.where(values > 0, values / penalty, values * penalty)
    logits[seen] = np.clip(penalized, -_LARGEST, _LARGEST)


def _divide(logits: np.ndarray, temperature: float) -> np.ndarray:
    """logits / temperature, in place. When a tiny temperature overflows the best one, divide each
    logit's distance from the best instead: the softmax is the same, the best stays at exactly 0
    and the rest go to -inf, so the distribution stays defined (greedy in the limit)."""
    best = logits.max()
    with np.errstate(over="ignore"):
        if np.isfinite(best / temperature):
            logits /= temperature
        else:
            logits -= best
            logits /= temperature
    return logits


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Ids (ascending) of the k highest scores and of every score tied with the k-th, as HF keeps them."""
    kth = np.partition(scores, -k)[-k]
    return np.flatnonzero(scores >= kth)


def _unnormalised(scores: np.ndarray) -> np.ndarray:
    """exp(score - best) in float32, in this thread's work array: the probabilities up to one
    factor, 1 at the best score.

    float32 because exp costs 4x less than in float64 here (0.34 vs 1.3 ms at vocab 262,144);
    each probability keeps a relative error of about 1e-7 per nat of distance from the best, the
    precision transformers itself has on float32 logits, and every sum over them is float64.
    """
    probs = _work_array("probs", scores.shape[0], np.float32)
    with np.errstate(over="ignore"):  # distances beyond float32 become -inf: probability 0
        np.subtract(scores, scores.max(), out=probs, casting="same_kind")
    return np.exp(probs, out=probs)


def _nucleus(scores: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """HF's top-p without sorting the vocabulary: (positions kept, their unnormalised probabilities).

    HF keeps a token when the softmax mass of the tokens ranked above it is below top_p (so at
    least the best one). Probabilities are grouped in buckets of about 4% width; the buckets
    above the one where the mass reaches top_p are kept whole, those below it dropped, and only
    that one bucket is sorted. Ties rank the lower position first, the token argmax picks.
    """
    probs = _unnormalised(scores)
    buckets, mass = _bucket_masses(probs)
    target = top_p * mass[-1]
    edge = int(np.searchsorted(mass, target))  # the first bucket whose cumulative mass reaches top_p
    edge_bucket = mass.shape[0] - 1 - edge
    flags = _work_array("flags", scores.shape[0], np.bool_)
    border = np.flatnonzero(np.equal(buckets, edge_bucket, out=flags))
    border = border[np.argsort(-scores[border], kind="stable")]
    border_probs = probs[border].astype(np.float64)
    above = (mass[edge - 1] if edge else 0.0) + np.cumsum(border_probs) - border_probs
    whole = np.flatnonzero(np.greater(buckets, edge_bucket, out=flags))
    kept = np.concatenate([whole, border[above < target]])
    return kept, probs[kept]


def _bucket_masses(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each probability's bucket, the cumulative mass of the buckets from the most probable down).

    The bits of a non-negative float32 order as its value, so the exponent and 4 mantissa bits
    number 16 buckets an octave, higher for more probable. intp buckets and float64 weights
    because np.bincount converts anything else slowly (2 ms instead of 0.3 here).
    """
    buckets = np.right_shift(probs.view(np.int32), 19, out=_work_array("buckets", probs.shape[0], np.intp))
    weights = _work_array("weights", probs.shape[0], np.float64)
    weights[...] = probs
    return buckets, np.bincount(buckets, weights=weights)[::-1].cumsum()


_BLOCK = 1024


def _categorical(probs: np.ndarray, rng: np.random.Generator) -> int:
    """A position drawn with probability probs[i] / probs.sum() from a single uniform of rng.

    Inverse CDF in two levels: the masses of blocks of _BLOCK entries, then a running sum inside
    the chosen block only, never a cumulative distribution over the whole vocabulary. One draw
    per row keeps the rng cost constant (exponential-race sampling would draw one per candidate:
    262,144 exponentials take 1.3 ms here). A position of zero probability is never returned:
    each target is kept strictly below the total it searches.
    """
    starts = np.arange(0, probs.shape[0], _BLOCK)
    block_mass = np.cumsum(np.add.reduceat(probs, starts, dtype=np.float64))
    target = min(rng.random() * block_mass[-1], np.nextafter(block_mass[-1], 0))
    block = int(np.searchsorted(block_mass, target, side="right"))
    inside = np.cumsum(probs[starts[block]:starts[block] + _BLOCK], dtype=np.float64)
    offset = min(target - (block_mass[block - 1] if block else 0.0), np.nextafter(inside[-1], 0))
    return int(starts[block]) + int(np.searchsorted(inside, offset, side="right"))
