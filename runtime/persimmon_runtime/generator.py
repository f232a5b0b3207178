"""Text generation over any backend: the public API (generate, stream, chat).

A Generator tokenizes and checks each request, then hands it to its `Scheduler`, which runs
every request in flight in one batch of cache rows (continuous batching) and sends each request
its own text pieces. Any number of threads may call a Generator at once; a thread may start a
request while it still consumes another's stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .backends import Backend, load_backend
from .chat import format_chat
from .errors import PersimmonError
from .manifest import Manifest
from .sampling import Sampler, SamplingParams
from .scheduler import PREFILL_CHUNK, Scheduler, Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer, build_tokenizer


@dataclass
class Completion:
    text: str
    token_ids: list[int]        # generated ids (no prompt, no EOS)
    finish_reason: str          # "eos", "stop", "length" or "cancelled" (should_stop said so)
    prompt_tokens: int


class Generator:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, prefill_chunk: int = PREFILL_CHUNK):
        """Generate over a loaded `backend` (`Generator.load` takes a backend's name and loads it)."""
        self.backend = backend
        self.manifest: Manifest = backend.manifest
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(backend, prefill_chunk=prefill_chunk)

    @classmethod
    def load(cls, build_dir: str, backend: str = "auto", device: str | None = None,
             verify_checksums: bool = True, prefill_chunk: int = PREFILL_CHUNK,
             prefill: str = "auto") -> "Generator":
        """Open a build directory (from `persimmon-export build`).

        backend: "auto" (TensorRT when the build has an engine and a GPU can run it, else
        onnxruntime), "onnxruntime" or "tensorrt". device: "cpu", "cuda", "cuda:N" or None for
        the backend's default. prefill_chunk: the most prompt tokens per row in one model step.
        prefill: "auto" (onnxruntime runs prompt steps on the build's int8 prefill graph where the
        CPU has AMX-INT8/VNNI), "int8" (always) or "off"; `backend.prefill_kernels` says which ran.
        """
        manifest = Manifest.load(build_dir, verify_checksums=verify_checksums)
        return cls(load_backend(build_dir, manifest, backend=backend, device=device, prefill=prefill),
                   build_tokenizer(build_dir, manifest), prefill_chunk=prefill_chunk)

    # ---- public API ----

    def generate(self, prompts: str | list[str], **sampling) -> Completion | list[Completion]:
        """Complete one prompt (-> Completion) or a list of prompts (-> list, same order)."""
        single = isinstance(prompts, str)
        sequences = self._prepare([prompts] if single else prompts, SamplingParams.from_settings(sampling))
        for _ in self.scheduler.submit(sequences).events():
            pass
        completions = [_completion(s) for s in sequences]
        return completions[0] if single else completions

    def stream(self, prompt: str, should_stop: Callable[[], bool] | None = None,
               on_finish: Callable[[Completion], None] | None = None, **sampling) -> Iterator[str]:
        """An iterator of the completion's text pieces, as tokens are decoded.

        The request is checked now; bad input raises here, not at the first iteration. It starts
        generating at the first iteration; closing the iterator early cancels it. `should_stop`
        (e.g. "has the client gone?") is asked after every piece and every 50 ms while waiting;
        once it answers True the stream ends and the request's row is freed at the next step.
        `on_finish` gets the Completion (finish reason, token counts) once the stream has ended.
        """
        if not isinstance(prompt, str):
            raise PersimmonError("stream() takes one prompt (str); use stream_batch() for several")
        finished = None if on_finish is None else (lambda completions: on_finish(completions[0]))
        return (piece for _, piece in self.stream_batch([prompt], should_stop=should_stop, on_finish=finished,
                                                        **sampling))

    def stream_batch(self, prompts: list[str], should_stop: Callable[[], bool] | None = None,
                     on_finish: Callable[[list[Completion]], None] | None = None,
                     **sampling) -> Iterator[tuple[int, str]]:
        """An iterator of (prompt index, text piece) as the prompts decode; checked like stream().
        `on_finish` gets the Completions, in prompt order, once every prompt has ended."""
        sequences = self._prepare(prompts, SamplingParams.from_settings(sampling))

        def pieces():
            yield from self.scheduler.submit(sequences).events(should_stop)
            if on_finish is not None:
                on_finish([_completion(s) for s in sequences])

        return pieces()

    def chat(self, messages, stream: bool = False, **sampling):
        """Answer a conversation (see `format_chat`; rendered with the build's chat template): a
        Completion, or text pieces with stream=True."""
        prompt = format_chat(messages, self.manifest.tokenizer.chat_template)
        return self.stream(prompt, **sampling) if stream else self.generate(prompt, **sampling)

    def close(self, timeout: float | None = None) -> None:
        """Cancel whatever is generating or waiting and wait for the model to be idle."""
        self.scheduler.close(timeout)

    # ---- requests ----

    def _prepare(self, prompts, params: SamplingParams) -> list[Sequence]:
        """Tokenize and validate every prompt before any compute."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise PersimmonError("prompts must be a str or a list of str")
        if not prompts:
            raise PersimmonError("the batch is empty: pass at least one prompt")
        capacity = self.manifest.kv_capacity
        eos = frozenset() if params.ignore_eos else frozenset(self.manifest.eos_token_ids)
        sequences = []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise PersimmonError(f"prompt {index} is a {type(prompt).__name__}, not a str")
            self.tokenizer.check_length(f"prompt {index}", prompt, capacity, "the build's kv_capacity")
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
            sequences.append(Sequence(index, ids, params, Sampler(params, prompt_index=index),
                                      IncrementalDetokenizer(self.tokenizer, ids), eos))
        return sequences


def _completion(sequence: Sequence) -> Completion:
    return Completion(sequence.text, sequence.token_ids, sequence.finish_reason, len(sequence.prompt_ids))
