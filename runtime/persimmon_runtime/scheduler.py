"""Continuous batching: requests from any thread share the backend's rows, step by step.

The backend is started once for the build's max_batch rows. A sequence (one prompt of a request)
waits in a queue until a row is free, is prefilled there in chunks, decodes one token per step
beside whatever else is running, and leaves its row the moment it finishes or its request is
cancelled; the next waiting sequence takes the row at the following step.

Each round of the loop runs at most one prefill step and one decode step:
- the prefill step covers only the newcomers' rows (a contiguous block, see `backends`), at most
  `prefill_chunk` tokens each. Sharing the decode step instead would make every decoding row
  compute the chunk's padding too: rows x chunk tokens instead of chunk (7.7x slower per round
  at 8 rows, measured in docs/benchmarks.md). Chunks also bound prefill memory by chunk x context, not context squared.
- the decode step covers the block from the first to the last decoding row; rows in between
  that are free or mid-prefill ride along as one padding token each (its key lands in a slot
  the row overwrites before reading it).
A sequence's tokens depend only on its own prompt, settings and seed, never on its neighbours.

The loop runs on a worker thread that exists while there is work (`close()` cancels it all). Callers never touch the
backend: they read their request's events (text pieces, the end, or an error).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import PersimmonError
from .sampling import Sampler, SamplingParams, sample
from .tokenizer import IncrementalDetokenizer

# Measured (docs/benchmarks.md, "Prefill in chunks"): a 1024-token prompt prefills as fast in
# chunks of 256 as in one step (894 vs 863 tok/s; 629 at 64), a smaller chunk holds the decoding
# rows back for less time per round, and memory grows with chunk x context.
PREFILL_CHUNK = 256

_NO_HISTORY = np.zeros(0, np.int64)  # for samplers that do not read the ids so far
_END = object()  # the event after a request's last piece


@dataclass
class Sequence:
    """One prompt's state: its cache progress, sampler, streaming detokenizer and stop strings."""

    index: int              # the prompt's place in its request
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    eos: frozenset[int]
    token_ids: list[int] = field(default_factory=list)
    cached: int = 0         # tokens in its cache row (prompt first, then fed-back samples)
    text: str = ""          # decoded so far (may end with a held-back possible stop prefix)
    emitted: int = 0        # len of text already handed out
    finish_reason: str | None = None
    request: Request | None = None

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt_ids)

    def add_text(self, piece: str, final: bool = False) -> str:
        """Append decoded text; return what is safe to emit (never part of a stop string).

        Only the new text and the withheld tail before it are searched: a stop string that
        started earlier would already have been found or been withheld.
        """
        stops = self.params.stop
        search_from = max(0, len(self.text) - max((len(s) for s in stops), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
            final = True
        safe = len(self.text) if final else _hold_start(self.text, stops, self.emitted)
        out = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return out

    def accept(self, token: int) -> str:
        """Take a sampled token; return the text it makes safe to emit (finishing the sequence if due)."""
        if token in self.eos:
            self.finish_reason = "eos"
            return self.add_text(self.detokenizer.finish(), final=True)
        self.token_ids.append(token)
        piece = self.add_text(self.detokenizer.push(token))
        if self.finish_reason is None and len(self.token_ids) == self.params.max_new_tokens:
            self.finish_reason = "length"
            piece += self.add_text(self.detokenizer.finish(), final=True)
        return piece


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


class Request:
    """What a caller holds: its sequences and their events, in order of production."""

    def __init__(self, sequences: list[Sequence]):
        self.sequences = sequences
        self.unfinished = len(sequences)
        self.cancelled = False
        self.failed = False  # its error was sent: no end event follows
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        for sequence in sequences:
            sequence.request = self

    def cancel(self) -> None:
        """Stop generating: the scheduler frees its rows before its next step (a no-op once done)."""
        self.cancelled = True

    def events(self, should_stop: Callable[[], bool] | None = None, poll_s: float = 0.05) -> Iterator[tuple[int, str]]:
        """(prompt index, text piece) until the request ends; re-raises its error.

        `should_stop` is asked after every piece and every `poll_s` between them; once it answers
        True the request is cancelled and the iterator ends. Closing the iterator cancels too.
        """
        try:
            while True:
                try:
                    event = self._events.get(timeout=poll_s if should_stop else None)
                except queue.Empty:
                    event = None
                if event is _END:
                    return
                if isinstance(event, BaseException):
                    raise event
                if event is not None:
                    yield event
                if should_stop is not None and should_stop():
                    return
        finally:
            self.cancel()

    def _emit(self, event) -> None:
        self._events.put(event)


class Scheduler:
    """Owns a started backend; `submit` may be called from any thread.

    `on_step(requests)`, if set, is called on the worker thread after every model step with the
    number of distinct requests that step advanced (metrics; keep it cheap).
    """

    def __init__(self, backend, prefill_chunk: int = PREFILL_CHUNK):
        if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
            raise PersimmonError(f"prefill_chunk={prefill_chunk!r} must be an integer >= 1 (tokens per prefill step)")
        self.backend = backend
        self.manifest = backend.manifest
        self.prefill_chunk = min(prefill_chunk, backend.max_step_tokens)
        self.on_step: Callable[[int], None] | None = None
        self.rows: list[Sequence | None] = [None] * self.manifest.max_batch
        self._waiting: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._broken: PersimmonError | None = None  # set when the backend cannot restart after a failure
        self._started = False  # the backend allocates its caches at the first request, on the worker

    def submit(self, sequences: list[Sequence]) -> Request:
        """Queue validated sequences (see Generator) as one request; work starts at once."""
        request = Request(sequences)
        with self._lock:
            self._waiting.extend(sequences)
            if self._worker is None:
                # not a daemon: at exit Python waits for the step in flight (a native library
                # killed mid-step aborts the process); cancelled requests then leave and it ends
                self._worker = threading.Thread(target=self._run, name="persimmon-scheduler")
                self._worker.start()
        return request

    def close(self, timeout: float | None = None) -> None:
        """Cancel every request in flight or waiting and wait (up to `timeout` s) for the worker to end."""
        with self._lock:
            requests = {id(s.request): s.request for s in [*self._waiting, *self.rows] if s is not None}
            worker = self._worker
        for request in requests.values():
            request.cancel()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    # ---- the worker ----

    def _run(self) -> None:
        while True:
            with self._lock:
                self._drop_cancelled()
                self._admit()
                if not any(self.rows):
                    self._worker = None  # submit() starts a new one for the next request
                    return
            try:
                if not self._started:
                    self.backend.start(self.manifest.max_batch)
                    self._started = True
                self._round()
            except Exception as e:  # the backend (or a bug of ours) failed: fail what ran, keep serving
                try:
                    self._fail_all(e)
                except Exception as again:  # the backend cannot even start: nothing can run, say why
                    self._broken = PersimmonError(f"the backend failed and could not restart: "
                                                  f"{again.__class__.__name__}: {again}")

    def _drop_cancelled(self) -> None:
        for row, sequence in enumerate(self.rows):
            if sequence is not None and sequence.request.cancelled:
                sequence.finish_reason = sequence.finish_reason or "cancelled"
                self._release(row)
        for sequence in [s for s in self._waiting if s.request.cancelled]:
            self._waiting.remove(sequence)
            sequence.finish_reason = "cancelled"
            self._finished(sequence)

    def _admit(self) -> None:
        """Waiting sequences take the free rows, lowest first (keeps the decode block short)."""
        while self._broken and self._waiting:
            sequence = self._waiting.popleft()
            self._fail(sequence.request, self._broken)
            self._finished(sequence)
        for row, sequence in enumerate(self.rows):
            if sequence is None and self._waiting:
                self.rows[row] = self._waiting.popleft()

    def _round(self) -> None:
        prefilling = [row for row, s in enumerate(self.rows) if s is not None and s.prefilling]
        if prefilling:
            first = prefilling[0]
            last = first
            while last + 1 < len(self.rows) and self.rows[last + 1] is not None and self.rows[last + 1].prefilling:
                last += 1
            self._prefill_step(first, last + 1)
        decoding = [row for row, s in enumerate(self.rows) if _decoding(s)]
        if decoding:
            self._decode_step(decoding[0], decoding[-1] + 1)

    def _prefill_step(self, start: int, stop: int) -> None:
        """The next chunk of each prompt in rows start..stop-1 (all prefilling)."""
        sequences = self.rows[start:stop]
        capacity = self.manifest.kv_capacity
        seq = min(self.prefill_chunk, max(len(s.prompt_ids) - s.cached for s in sequences),
                  min(capacity - s.cached for s in sequences))  # padding slots must fit too
        input_ids = np.zeros((len(sequences), seq), np.int64)
        first_slot = np.array([s.cached for s in sequences], np.int64)
        token_count = np.array([min(seq, len(s.prompt_ids) - s.cached) for s in sequences], np.int64)
        for i, s in enumerate(sequences):
            input_ids[i, :token_count[i]] = s.prompt_ids[s.cached:s.cached + token_count[i]]
        logits = self._step(sequences, input_ids, first_slot, token_count, start)
        for s, count in zip(sequences, token_count):
            s.cached += int(count)
        done = [i for i, s in enumerate(sequences) if not s.prefilling]
        self._sample(start, [sequences[i] for i in done], logits[done])

    def _decode_step(self, start: int, stop: int) -> None:
        """One token for every decoding row in start..stop-1; the rows between ride as padding."""
        block = self.rows[start:stop]
        decoding = [_decoding(s) for s in block]
        input_ids = np.zeros((len(block), 1), np.int64)
        first_slot = np.zeros(len(block), np.int64)
        for i, s in enumerate(block):
            if s is not None:  # a mid-prefill row writes its junk key at its next slot, rewritten next chunk
                first_slot[i] = s.cached
            if decoding[i]:
                input_ids[i, 0] = s.token_ids[-1]
        logits = self._step([s for s, d in zip(block, decoding) if d], input_ids, first_slot,
                            np.ones(len(block), np.int64), start)
        rows = [i for i, d in enumerate(decoding) if d]
        for i in rows:
            block[i].cached += 1
        self._sample(start, [block[i] for i in rows], logits[rows])

    def _step(self, sequences: list[Sequence], input_ids, first_slot, token_count, first_row: int) -> np.ndarray:
        width = int((first_slot + token_count).max())
        logits = self.backend.step(input_ids, first_slot, token_count, np.ones((len(input_ids), width), np.int64),
                                   first_row)
        if self.on_step is not None:
            self.on_step(len({id(s.request) for s in sequences}))
        return logits

    def _sample(self, start: int, sequences: list[Sequence], logits: np.ndarray) -> None:
        """Choose each sequence's next token, hand out its text, free the rows that finished."""
        for s, row_logits in zip(list(sequences), logits):
            if not (np.isfinite(row_logits.max()) and np.isfinite(row_logits.min())):
                self._fail(s.request, self._non_finite(s))
        keep = [i for i, s in enumerate(sequences) if not s.request.cancelled]
        sequences = [sequences[i] for i in keep]
        histories = [np.asarray(s.prompt_ids + s.token_ids) if s.sampler.reads_history else _NO_HISTORY
                     for s in sequences]
        tokens = sample(logits[keep], [s.sampler for s in sequences], histories) if sequences else []
        for s, token in zip(sequences, tokens):
            piece = s.accept(int(token))
            if piece:
                s.request._emit((s.index, piece))
            if s.finish_reason:
                self._release(self.rows.index(s))

    def _non_finite(self, sequence: Sequence) -> PersimmonError:
        """NaN/inf logits: argmax would answer token 0 and sampling would fail, so refuse, naming the cause."""
        cause = ("float16 overflow (this is a float16 build: rebuild with `persimmon-export build --dtype float32`, "
                 "and measure a build with `persimmon-export parity`)" if self.manifest.dtype == "float16"
                 else "a numerical fault in the build (check it with `persimmon-export parity`)")
        return PersimmonError(f"the model produced NaN/inf logits for prompt {sequence.index} at generated token "
                              f"{len(sequence.token_ids)}; nothing was sampled from them. Likely causes: {cause}, "
                              f"or corrupt weights (verify the build's checksums or rebuild it from the checkpoint)")

    # ---- bookkeeping (the worker thread alone touches rows and requests' counts) ----

    def _release(self, row: int) -> None:
        sequence = self.rows[row]
        self.rows[row] = None
        self._finished(sequence)

    def _finished(self, sequence: Sequence) -> None:
        request = sequence.request
        request.unfinished -= 1
        if request.unfinished == 0 and not request.failed:
            request._emit(_END)

    def _fail(self, request: Request, error: Exception) -> None:
        """End `request` with `error`: its rows and waiting sequences go at the next round."""
        if not (request.failed or request.cancelled):
            request.failed = True
            request._emit(error)
        request.cancel()

    def _fail_all(self, error: Exception) -> None:
        """A step failed: every running request gets the error, and the backend starts afresh."""
        for sequence in [s for s in self.rows if s is not None]:
            self._fail(sequence.request, error if isinstance(error, PersimmonError) else
                       PersimmonError(f"the model step failed: {error.__class__.__name__}: {error}"))
        with self._lock:
            self._drop_cancelled()
        self.backend.start(self.manifest.max_batch)  # zeroed caches; if this fails too, _run says so


def _decoding(sequence: Sequence | None) -> bool:
    return (sequence is not None and not sequence.prefilling and sequence.finish_reason is None
            and not sequence.request.cancelled)
