"""Triton Inference Server model (Python backend, decoupled): text in, text out, streamed.

Input `text_input` (one UTF-8 string); output `text_output`. Sampling settings come as request
parameters with the runtime's names (in HTTP `generate` / `generate_stream` JSON they are
top-level keys or a "parameters" object; in gRPC, request parameters):
  max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos,
  stop (a string, or a JSON list of strings), stream (true: one response per text piece;
  false, the default: one response with the whole text, as `generate` requires),
  timeout_s (seconds after which the client no longer wants the answer).
Errors: an unknown parameter, a bad value, or a missing, non-UTF-8 or too long text is refused in
`execute` with INVALID_ARG (HTTP 400); a generation error (such as non-finite logits) is INTERNAL
(500) and a passed deadline UNAVAILABLE (503), as Triton's own request timeout is. Each gets one
error response and the model goes on serving. Checked requests run on their own threads (the model
returns from `execute` at once) and join the generator's scheduler: every request in flight shares
each model step (continuous batching, up to the build's max_batch rows; the rest wait for a free row).

Leaving clients: a cancelled gRPC request or a closed `generate_stream` connection is seen at
the next text piece (or within 50 ms while none comes) and its row is freed. A non-streaming
`generate` connection gives no such sign (Triton reads nothing from it until the reply is ready),
so such a request stops at its deadline: its `timeout_s`, or at the latest the model's
`generate_timeout_s` parameter (written by `persimmon-export triton --generate-timeout`). A
request whose deadline passes while it waits for a row is dropped without computing.

Metrics (with tritonserver --allow-metrics): counters persimmon_steps_total (model steps) and
persimmon_step_requests_total (requests advanced, summed over steps); their ratio is the mean
number of requests per step. persimmon_requests_total{outcome=...} counts how requests ended
(success, refused, timeout, failed, cancelled). Triton's own nv_inference_request_failure counts
the refused ones only: its Python backend fixes a decoupled request's statistics when `execute`
returns, so `execute` raises (RequestsRefused) when it refused every request it got, and a request
that fails later, or is refused beside an accepted one, counts there as a success.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import traceback
from typing import NamedTuple

import numpy as np

from .chat import format_chat
from .errors import PersimmonError, brief
from .generator import Generator
from .openai_protocol import FINISH_REASONS
from .sampling import MAX_STOP_CHARS, MAX_STOPS

# the longest JSON list of allowed stops: each string escaped at most 6 characters a character
MAX_STOP_JSON_CHARS = MAX_STOPS * (6 * MAX_STOP_CHARS + 4) + 2

SAMPLING = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
            "repetition_penalty": float, "seed": int, "ignore_eos": bool}
CONTROL = ("stream", "stop", "timeout_s", "chat")
# TensorRT-LLM's names for the same settings (its Triton `generate` body: max_tokens, stop_words, ...)
ALIASES = {"max_tokens": "max_new_tokens", "random_seed": "seed", "stop_words": "stop"}
# TensorRT-LLM fields taken as they are: end_id must be one of the build's end tokens (checked at
# generation), pad_id is unused (rows are never padded), bad_words must be empty
ACCEPTED = {"end_id": int, "pad_id": int}
# optional input tensors, so that `generate` takes real JSON lists for them (Triton turns a body key
# naming an input into a tensor, any other into a scalar parameter)
LIST_INPUTS = ("stop", "stop_words", "bad_words")


class RequestSettings(NamedTuple):
    stream: bool
    timeout_s: float | None   # None: the client set no deadline
    sampling: dict            # keyword arguments for Generator.stream
    chat: bool = False        # text_input is a user turn, rendered with the build's chat template
    end_id: int | None = None



def parse_parameters(raw: str | dict | None, lists: dict | None = None) -> RequestSettings:
    """Request parameters (Triton's JSON text, or a dict) and the LIST_INPUTS tensors given (name ->
    list of strings) -> RequestSettings; PersimmonError names a bad one."""
    try:
        params = json.loads(raw) if isinstance(raw, str) and raw else raw or {}
    except json.JSONDecodeError as e:
        raise PersimmonError(f"request parameters are not JSON ({e.msg}); send an object of settings") from None
    except RecursionError:  # arrays nested thousands deep: no setting is
        raise PersimmonError("request parameters are nested too deep; send an object of settings") from None
    if not isinstance(params, dict):
        raise PersimmonError(f"request parameters {brief(params)} must be an object of settings")
    params = dict(params)
    for name, values in (lists or {}).items():
        if name in params:
            raise PersimmonError(f"{name} is given both as an input and as a parameter; send it once")
        params[name] = _list_input(values)
    stream = params.pop("stream", False)
    if not isinstance(stream, bool):
        raise PersimmonError(f"parameter stream={brief(stream)} must be true or false")
    timeout_s = params.pop("timeout_s", None)
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not 0 < timeout_s < math.inf):
        raise PersimmonError(f"parameter timeout_s={brief(timeout_s)} must be a number of seconds > 0")
    chat = params.pop("chat", False)
    if not isinstance(chat, bool):
        raise PersimmonError(f"parameter chat={brief(chat)} must be true or false")
    sampling, accepted = {}, {}
    for given, value in params.items():
        name = ALIASES.get(given, given)
        if name in sampling:
            raise PersimmonError(f"parameter {given} sets {name} a second time; send one of them")
        if given == "stop_words":
            if stops := _non_empty(value):
                sampling["stop"] = stops
        elif name == "stop":
            sampling["stop"] = _stop_list(value)
        elif name == "bad_words":
            if _non_empty(value):
                raise PersimmonError("parameter bad_words is not supported; send it empty or leave it out")
        elif name in SAMPLING:
            sampling[name] = _typed(given, value, SAMPLING[name])
        elif name in ACCEPTED:
            accepted[name] = _typed(given, value, ACCEPTED[name])
        else:
            known = CONTROL + tuple(SAMPLING) + tuple(ALIASES) + tuple(ACCEPTED) + ("bad_words",)
            raise PersimmonError(f"unknown parameter {brief(given)}; known: {', '.join(known)}")
    return RequestSettings(stream, None if timeout_s is None else float(timeout_s), sampling, chat,
                           accepted.get("end_id"))


def _non_empty(value):
    """A TensorRT-LLM word list (stop_words, bad_words) without its "" entries, which mean none."""
    words = _stop_list(value)
    return [word for word in words if word != ""] if isinstance(words, list) else words


def _list_input(values: list[str]):
    """A list input's strings as given, except one string holding a JSON list of strings, which is
    that list (how lists were sent before they could be inputs: `"stop": "[\\"a\\", \\"b\\"]"`)."""
    if len(values) == 1 and values[0].startswith("["):
        if len(values[0]) > MAX_STOP_JSON_CHARS:
            return values[0]  # refused in one line by _stop_list, as a parameter would be
        try:
            parsed = json.loads(values[0])
        except (ValueError, RecursionError):
            return values
        if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
            return parsed
    return values


def _stop_list(value):
    """A stop string, or a JSON list of them in one string (Triton parameters are scalars).
    The generator checks the strings themselves (type, count and length)."""
    if not (isinstance(value, str) and value.startswith("[")):
        return value
    if len(value) > MAX_STOP_JSON_CHARS:  # more than any list of allowed stops spells: no parse
        raise PersimmonError(f"parameter stop is a {len(value):,}-character JSON list; stops are at most "
                             f"{MAX_STOPS} strings of {MAX_STOP_CHARS} characters")
    try:
        return json.loads(value)
    except RecursionError:
        raise PersimmonError("parameter stop is a JSON list nested too deep; send a list of strings") from None
    except json.JSONDecodeError as e:
        raise PersimmonError(f"parameter stop={brief(value)} starts with '[' but is not a JSON list ({e.msg}); "
                             f"send a list of strings, or put a stop that starts with '[' inside one") from None


def _typed(name: str, value, kind: type):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PersimmonError(f"parameter {name}={brief(value)} must be {kind.__name__}")
    return value


def string_list(name: str, values) -> list[str]:
    """An optional list input's strings (BYTES elements, UTF-8)."""
    if len(values) > 4 * MAX_STOPS:  # a few empty ones are fine (TensorRT-LLM's "" for none), thousands are not
        raise PersimmonError(f"{name} has {len(values)} strings; stops are at most {MAX_STOPS}")
    return [_utf8(name, value, "strings") for value in values]


def text_input(values) -> str:
    if len(values) != 1:
        raise PersimmonError(f"text_input must hold exactly one string, got {len(values)}")
    return _utf8("text_input", values[0], "prompt")


def _utf8(name: str, value, what: str) -> str:
    """One BYTES element as text; not UTF-8 is one line naming the input and the bad byte."""
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PersimmonError(f"{name} is not UTF-8 (byte 0x{value[e.start]:02x} at offset {e.start}); "
                             f"send the {what} as UTF-8 text") from None


class _Deadline:
    """When a request stops being worth computing; `reason` says who set it, for the error line."""

    def __init__(self, settings: RequestSettings, generate_timeout_s: float):
        limits = []
        if settings.timeout_s is not None:
            limits.append((settings.timeout_s, f"the request's timeout_s={settings.timeout_s:g}"))
        if not settings.stream and generate_timeout_s > 0:
            # Only a non-streaming client can leave unseen; streams stop when their client goes.
            limits.append((generate_timeout_s, f"the model's generate_timeout_s={generate_timeout_s:g} "
                                               f"(stream, or set timeout_s, for longer requests)"))
        self.start = time.monotonic()
        self.seconds, self.reason = min(limits) if limits else (math.inf, "")

    def remaining(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def error(self, doing: str) -> PersimmonError:
        return PersimmonError(f"{doing}; stopped after {time.monotonic() - self.start:.1f} s: {self.reason}")


def _generate_timeout(text: str) -> float:
    """The config.pbtxt parameter (a hand-edited config may hold anything)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise PersimmonError(f"config.pbtxt parameter generate_timeout_s={brief(text)} must be a number of "
                             f"seconds >= 0 (0: no limit)")
    return seconds


def model_parameters(args: dict) -> tuple[dict, str]:
    """(config.pbtxt's parameters, the build directory they name) from Triton's initialize args."""
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    return params, os.path.join(args["model_repository"], args["model_version"], params.get("build_dir", "build"))


class TritonLogHandler(logging.Handler):
    """Our libraries' log records (the first load's checksum progress, ...) into Triton's own log."""

    def __init__(self, pb_utils):
        super().__init__(logging.INFO)
        self.logger = pb_utils.Logger

    def emit(self, record) -> None:
        write = (self.logger.log_error if record.levelno >= logging.ERROR else
                 self.logger.log_warn if record.levelno >= logging.WARNING else self.logger.log_info)
        write(f"persimmon: {record.getMessage()}")


def log_to_triton(pb_utils) -> None:
    """Send persimmon_runtime's INFO and above to Triton's log (once per process: one stub per instance)."""
    logger = logging.getLogger("persimmon_runtime")
    if not any(isinstance(handler, TritonLogHandler) for handler in logger.handlers):
        logger.addHandler(TritonLogHandler(pb_utils))
        logger.setLevel(logging.INFO)


def triton_error(pb_utils, message: str, code: str = "INTERNAL"):
    """A TritonError with Triton's error code by name (INVALID_ARG: HTTP 400, UNAVAILABLE: 503,
    INTERNAL: 500), where the backend has codes; older ones take the message alone."""
    code_value = getattr(pb_utils.TritonError, code, None)
    return pb_utils.TritonError(message) if code_value is None else pb_utils.TritonError(message, code_value)


class RequestsRefused(Exception):
    """Raised by execute when it answered every request it got with an error: Triton's Python backend
    reports a decoupled model's request statistics when execute returns, as successes unless it
    raised (python_backend src/pb_metric_reporter.cc), and sends no second error to a request whose
    response sender already sent its final response (src/python_be.cc, closed requests)."""


# how a request ended, for the persimmon_requests_total counter and the error's code
OUTCOMES = {"success": None, "refused": "INVALID_ARG", "timeout": "UNAVAILABLE", "failed": "INTERNAL",
            "cancelled": None}


class _Metrics:
    """Prometheus counters through Triton's custom-metrics API: the scheduler's steps (its on_step) and
    how each request ended.

    Every Metric call holds one lock: the Python backend's Metric.increment is not thread-safe
    (python_backend src/metric.cc, SendIncrementRequest releases the GIL and then replaces the
    metric's shared-memory record that the server process reads), and request threads ending in
    the same step incremented the same counter at once - tritonserver died with SIGSEGV in
    libtriton_python.so (tests/test_triton.py, requests ending together)."""

    def __init__(self, family, model: str):
        labels = {"model": model}
        self.lock = threading.Lock()
        self.families = [
            family(name="persimmon_steps_total", description="Model steps run by the scheduler", kind=family.COUNTER),
            family(name="persimmon_step_requests_total", kind=family.COUNTER,
                   description="Requests advanced by model steps, summed over steps (/ steps = mean batch)"),
            family(name="persimmon_requests_total", kind=family.COUNTER,
                   description="Requests by how they ended: " + ", ".join(OUTCOMES))]
        self.steps, self.requests = (f.Metric(labels=labels) for f in self.families[:2])
        self.outcomes = {outcome: self.families[2].Metric(labels={**labels, "outcome": outcome})
                         for outcome in OUTCOMES}

    def __call__(self, request_count: int) -> None:
        with self.lock:
            if self.steps is not None:
                self.steps.increment(1)
                self.requests.increment(request_count)

    def ended(self, outcome: str) -> None:
        with self.lock:
            if self.outcomes is not None:  # a request thread may end after finalize closed the metrics
                self.outcomes[outcome].increment(1)

    def close(self) -> None:
        with self.lock:
            self.steps = self.requests = self.outcomes = None  # a Metric must go before its MetricFamily
            self.families = []


class _Request(NamedTuple):
    """A checked request, ready to generate."""
    sender: object
    settings: RequestSettings
    deadline: _Deadline
    pieces: object        # Generator.stream's iterator (generation starts at its first item)
    finished: list        # the Completion, once the stream has ended
    stopped: list         # "cancelled" or "timeout", once should_stop has said yes


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params, build_dir = model_parameters(args)
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu"
        backend = params.get("backend", "auto")
        self.generate_timeout_s = _generate_timeout(params.get("generate_timeout_s", "0"))
        log_to_triton(pb_utils)
        self.generator = Generator.load(build_dir, backend=backend, device=device,
                                        prefill=params.get("prefill", "auto"))
        family = getattr(pb_utils, "MetricFamily", None)  # Tritons before 23.03 have no custom metrics
        self.metrics = _Metrics(family, args["model_name"]) if family else None
        self.generator.scheduler.on_step = self.metrics
        pb_utils.Logger.log_info(f"persimmon: {build_dir} on {self.generator.backend.name} ({device}), prefill "
                                 f"{self.generator.backend.prefill_kernels}")

    def execute(self, requests):
        """Check each request here (a bad one is answered at once), then generate on its own thread."""
        refused = 0
        for request in requests:
            sender = request.get_response_sender()
            try:
                accepted = self._accept(request, sender)
            except Exception as e:
                refused += 1
                self._end(sender, *self._outcome(e, "refused"))
                continue
            threading.Thread(target=self._serve, args=(accepted,), daemon=True).start()
        if requests and refused == len(requests):
            raise RequestsRefused(f"{refused} request(s) refused, each answered with its error; raised so that "
                                  f"Triton counts them as failures")
        return None

    def _accept(self, request, sender) -> _Request:
        """Inputs, parameters and prompt checked and tokenized; PersimmonError names what is wrong."""
        tensor = self.pb.get_input_tensor_by_name(request, "text_input")
        text = text_input(tensor.as_numpy().reshape(-1) if tensor is not None else [])
        lists = {name: string_list(name, tensor.as_numpy().reshape(-1)) for name in LIST_INPUTS
                 if (tensor := self.pb.get_input_tensor_by_name(request, name)) is not None}
        settings = parse_parameters(request.parameters(), lists)
        manifest = self.generator.manifest
        if settings.end_id is not None and settings.end_id not in manifest.eos_token_ids:
            raise PersimmonError(f"parameter end_id={settings.end_id} is not this model's end token "
                                 f"({', '.join(map(str, manifest.eos_token_ids)) or 'none'}); leave it out")
        if settings.chat:
            text = format_chat(text, manifest.tokenizer.chat_template)
        deadline = _Deadline(settings, self.generate_timeout_s)
        stopped = []  # why should_stop said yes, if it did

        def should_stop() -> bool:  # asked between pieces and every 50 ms while waiting for one
            if not stopped and (sender.is_cancelled() or deadline.remaining() <= 0):
                stopped.append("cancelled" if sender.is_cancelled() else "timeout")
            return bool(stopped)

        finished = []
        pieces = self.generator.stream(text, should_stop=should_stop, on_finish=finished.append, **settings.sampling)
        return _Request(sender, settings, deadline, pieces, finished, stopped)

    def _serve(self, accepted: _Request) -> None:
        """Generate one accepted request; whatever goes wrong becomes its error response, never a dead model."""
        try:
            outcome, error = self._generate(accepted), None
        except Exception as e:
            outcome, error = self._outcome(e, "timeout" if accepted.stopped[:1] == ["timeout"] else "failed")
        self._end(accepted.sender, outcome, error)

    def _outcome(self, e: Exception, outcome: str) -> tuple[str, str]:
        """(outcome, error line) for an exception: ours (PersimmonError) as it is, a bug logged with its trace."""
        if isinstance(e, PersimmonError):
            return outcome, str(e)
        self.pb.Logger.log_error(f"persimmon: {traceback.format_exc()}")
        return "failed", f"internal error: {e.__class__.__name__}: {e}"

    def _end(self, sender, outcome: str, error: str | None = None) -> None:
        """The request's final response (its error, if any), counted by how it ended."""
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            metrics = self.metrics
            if metrics is not None:
                metrics.ended(outcome)
            if error is None:
                sender.send(flags=final)
            else:
                sender.send(self.pb.InferenceResponse(error=triton_error(self.pb, error, OUTCOMES[outcome])),
                            flags=final)
        except Exception as e:  # the client is gone or the request already ended: nobody to tell
            self.pb.Logger.log_warn(f"persimmon: could not send the final response ({e}); request error: {error}")

    def _generate(self, accepted: _Request) -> str:
        """Stream or collect the text pieces and send them; the outcome ("success" or "cancelled")."""
        sender, settings, pieces = accepted.sender, accepted.settings, accepted.pieces
        collected, characters = [], 0
        try:
            if not sender.is_cancelled():
                for piece in pieces:
                    characters += len(piece)
                    if settings.stream:
                        sender.send(self._response(piece))
                    else:
                        collected.append(piece)
        finally:
            pieces.close()  # cancels the request now (freeing its row) unless it finished
        if sender.is_cancelled() or accepted.stopped == ["cancelled"]:
            return "cancelled"
        if accepted.stopped:
            raise accepted.deadline.error(f"generated {characters} characters")
        # the whole text (generate), or the end of the pieces (a stream): with why it ended and the counts
        finished = accepted.finished
        sender.send(self._response("" if settings.stream else "".join(collected), finished[0] if finished else None))
        # the model unloading (finalize) cancels what is in flight: the text so far is sent, counted as cancelled
        return "cancelled" if finished and finished[0].finish_reason == "cancelled" else "success"

    def _response(self, text: str, completion=None):
        tensors = [self.pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=object))]
        if completion is not None:
            reason = FINISH_REASONS.get(completion.finish_reason, completion.finish_reason or "")
            tensors += [self.pb.Tensor("finish_reason", np.array([reason.encode()], dtype=object)),
                        self.pb.Tensor("prompt_tokens", np.array([completion.prompt_tokens], dtype=np.int32)),
                        self.pb.Tensor("completion_tokens", np.array([len(completion.token_ids)], dtype=np.int32))]
        return self.pb.InferenceResponse(tensors)

    def finalize(self):
        self.generator.close(timeout=30)  # in-flight requests end as cancelled; the step running finishes
        self.generator = None
        metrics, self.metrics = self.metrics, None
        if metrics is not None:
            metrics.close()
