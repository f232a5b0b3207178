"""Text generation over any backend: batching, sampling, stop strings, EOS and streaming.

The loop is written once; a backend only runs one model step over its KV cache. A batch is
prefilled in one step (prompts right-padded, each row written from slot 0, `token_count` says
which logits are the row's), then decoded one token per row per step at per-row cache slots.

A backend holds one KV cache, so a Generator runs one request at a time: a lock serializes
requests from several threads, and a stream holds it from its first piece until it is exhausted
or closed (see `Generator._exclusive`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .backends import load_backend
from .chat import format_chat
from .errors import PersimmonError
from .manifest import Manifest
from .sampling import Sampler, SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer

_NO_HISTORY = np.zeros(0, np.int64)  # for samplers that do not read the ids so far


@dataclass
class Completion:
    text: str
    token_ids: list[int]        # generated ids (no prompt, no EOS)
    finish_reason: str          # "eos", "stop", "length" or "cancelled" (should_stop said so)
    prompt_tokens: int


@dataclass
class _Sequence:
    """One row's state: its sampler, streaming detokenizer and stop-string bookkeeping."""

    index: int              # the prompt's place in the request, for error messages
    prompt_ids: list[int]
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stop: tuple[str, ...]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""          # decoded so far (may end with a held-back possible stop prefix)
    emitted: int = 0        # len of text already handed out
    finish_reason: str | None = None

    def add_text(self, piece: str, final: bool = False) -> str:
        """Append decoded text; return what is safe to emit (never part of a stop string).

        Only the new text and the withheld tail before it are searched: a stop string that
        started earlier would already have been found or been withheld.
        """
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
            final = True
        safe = len(self.text) if final else _hold_start(self.text, self.stop, self.emitted)
        out = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return out


def _hold_start(text: str, stops: tuple[str, ...], start: int) -> int:
    """Where the longest suffix of text[start:] that could still grow into a stop string begins
    (len(text) when none could).

    `start` is where the previous call's held-back text began: a suffix that is a stop's prefix
    now was one before too, so nothing earlier can qualify. Only positions holding a stop's first
    character are tried, so a step costs a few C-level scans per stop, not a loop over prefixes.
    """
    best = len(text)
    for stop in stops:
        pos = text.find(stop[0], max(start, len(text) - len(stop) + 1), best)
        while pos >= 0 and not stop.startswith(text[pos:]):
            pos = text.find(stop[0], pos + 1, best)
        if pos >= 0:
            best = pos
    return best


def prefill(backend, prompt_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Start `backend` on a batch of prompts: one step, right-padded, every row from slot 0.

    Returns the logits of each prompt's last token and each row's next cache slot.
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


class Generator:
    def __init__(self, backend, tokenizer: Tokenizer):
        self.backend = backend
        self.manifest: Manifest = backend.manifest
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._driver: int | None = None  # the thread running the request that holds the lock

    @classmethod
    def load(cls, build_dir: str, backend: str = "auto", device: str | None = None,
             verify_checksums: bool = True) -> "Generator":
        """Open a build directory (from `persimmon-export build`).

        backend: "auto" (TensorRT when the build has an engine and a GPU can run it, else
        onnxruntime), "onnxruntime" or "tensorrt". device: "cpu", "cuda", "cuda:N" or None for
        the backend's default.
        """
        manifest = Manifest.load(build_dir, verify_checksums=verify_checksums)
        spec = manifest.tokenizer
        tokenizer = Tokenizer(os.path.join(build_dir, spec.file), add_bos=spec.add_bos, bos_token=spec.bos_token,
                              eos_token=spec.eos_token)
        return cls(load_backend(build_dir, manifest, backend=backend, device=device), tokenizer)

    # ---- public API ----

    def generate(self, prompts: str | list[str], **sampling) -> Completion | list[Completion]:
        """Complete one prompt (-> Completion) or a list of prompts (-> list, same order)."""
        single = isinstance(prompts, str)
        params = SamplingParams.from_settings(sampling)
        sequences = self._prepare([prompts] if single else prompts, params)
        with self._exclusive():
            for batch in self._batches(sequences):
                for _ in self._run(batch, params):
                    pass
        completions = [Completion(s.text, s.token_ids, s.finish_reason, len(s.prompt_ids)) for s in sequences]
        return completions[0] if single else completions

    def stream(self, prompt: str, should_stop: Callable[[], bool] | None = None, **sampling) -> Iterator[str]:
        """An iterator of the completion's text pieces, as tokens are decoded.

        The request is checked now; bad input raises here, not at the first iteration.
        `should_stop` (e.g. "has the client gone?") is asked before every model step; once it
        answers True the stream ends.
        """
        if not isinstance(prompt, str):
            raise PersimmonError("stream() takes one prompt (str); use stream_batch() for several")
        return (piece for _, piece in self.stream_batch([prompt], should_stop=should_stop, **sampling))

    def stream_batch(self, prompts: list[str], should_stop: Callable[[], bool] | None = None,
                     **sampling) -> Iterator[tuple[int, str]]:
        """An iterator of (prompt index, text piece) as the batch decodes; checked like stream().

        From its first piece until it is exhausted or closed, the iterator holds this Generator:
        other threads wait, and a request started meanwhile by the thread consuming it raises.
        """
        params = SamplingParams.from_settings(sampling)
        sequences = self._prepare(prompts, params)

        def pieces():
            with self._exclusive():
                for batch in self._batches(sequences):
                    for row, piece in self._run(batch, params, should_stop):
                        yield batch[row].index, piece
                        self._driver = threading.get_ident()  # whichever thread resumed us drives it now

        return pieces()

    def chat(self, messages, stream: bool = False, **sampling):
        """Answer a conversation (see `format_chat`): a Completion, or text pieces with stream=True."""
        prompt = format_chat(messages)
        return self.stream(prompt, **sampling) if stream else self.generate(prompt, **sampling)

    # ---- one request at a time ----

    @contextmanager
    def _exclusive(self):
        """Hold the backend (its one KV cache) for one request.

        Another thread waits its turn. The thread that drives the request holding it cannot wait
        (it would wait for itself), so it gets a PersimmonError instead: that is a second request
        started while its own stream is unfinished.
        """
        if self._driver == threading.get_ident():
            raise PersimmonError("this Generator is busy with an unfinished stream that this thread is consuming: "
                                 "exhaust it or call its close() first, or pass several prompts to one "
                                 "stream_batch()/generate() call")
        with self._lock:
            self._driver = threading.get_ident()
            try:
                yield
            finally:
                self._driver = None

    # ---- the loop ----

    def _prepare(self, prompts, params: SamplingParams) -> list[_Sequence]:
        """Tokenize and validate every prompt before any compute."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise PersimmonError("prompts must be a str or a list of str")
        if not prompts:
            raise PersimmonError("the batch is empty: pass at least one prompt")
        capacity = self.manifest.kv_capacity
        sequences = []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise PersimmonError(f"prompt {index} is a {type(prompt).__name__}, not a str")
            try:
                ids = self.tokenizer.encode(prompt)
            except PersimmonError as e:
                raise PersimmonError(f"prompt {index}: {e}") from None
            if not ids:
                raise PersimmonError(f"prompt {index} is empty and the tokenizer adds no BOS: nothing to condition on")
            if len(ids) + params.max_new_tokens > capacity:
                raise PersimmonError(
                    f"prompt {index} has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} that exceeds "
                    f"the build's kv_capacity {capacity}: shorten it, lower max_new_tokens or rebuild with a larger "
                    f"--kv-capacity")
            sequences.append(_Sequence(index, ids, Sampler(params, row=index),
                                       IncrementalDetokenizer(self.tokenizer, ids), params.stop))
        return sequences

    def _batches(self, sequences: list[_Sequence]) -> Iterator[list[_Sequence]]:
        size = self.manifest.max_batch
        for start in range(0, len(sequences), size):
            yield sequences[start:start + size]

    def _run(self, sequences: list[_Sequence], params: SamplingParams,
             should_stop: Callable[[], bool] | None = None) -> Iterator[tuple[int, str]]:
        """Prefill, then decode until every row finished; yield (row, text piece) as text appears.

        `should_stop` is asked before every step, so a caller whose client has gone stops the
        work within one step even while the tokens decode to no text yet.
        """
        eos = set() if params.ignore_eos else set(self.manifest.eos_token_ids)
        batch = len(sequences)
        logits, positions = prefill(self.backend, [s.prompt_ids for s in sequences])
        last_step = params.max_new_tokens - 1
        for step in range(params.max_new_tokens):
            if should_stop is not None and should_stop():
                for s in sequences:
                    s.finish_reason = s.finish_reason or "cancelled"
                return
            tokens = np.zeros(batch, np.int64)
            for row, s in enumerate(sequences):
                if s.finish_reason:
                    continue
                self._require_finite(logits[row], s)
                history = np.asarray(s.prompt_ids + s.token_ids) if s.sampler.reads_history else _NO_HISTORY
                tokens[row] = token = s.sampler(logits[row], history)
                if token in eos:
                    s.finish_reason = "eos"
                    piece = s.add_text(s.detokenizer.finish(), final=True)
                else:
                    s.token_ids.append(token)
                    piece = s.add_text(s.detokenizer.push(token))
                    if s.finish_reason is None and step == last_step:
                        s.finish_reason = "length"
                        piece += s.add_text(s.detokenizer.finish(), final=True)
                if piece:
                    yield row, piece
            if all(s.finish_reason for s in sequences):
                return
            logits = decode(self.backend, tokens, positions)

    def _require_finite(self, logits: np.ndarray, sequence: _Sequence) -> None:
        """Refuse to sample from NaN/inf logits: argmax would answer token 0 and sampling would fail.

        min and max propagate NaN and see both infinities; two vectorized reductions over the row
        (about 50 us for a 262144-entry vocabulary) and no temporary array.
        """
        if np.isfinite(logits.max()) and np.isfinite(logits.min()):
            return
        cause = ("float16 overflow (this is a float16 build: rebuild with `persimmon-export build --dtype float32`, "
                 "and measure a build with `persimmon-export parity`)" if self.manifest.dtype == "float16"
                 else "a numerical fault in the build (check it with `persimmon-export parity`)")
        raise PersimmonError(f"the model produced NaN/inf logits for prompt {sequence.index} at generated token "
                             f"{len(sequence.token_ids)}; nothing was sampled from them. Likely causes: {cause}, "
                             f"or corrupt weights (verify the build's checksums or rebuild it from the checkpoint)")
