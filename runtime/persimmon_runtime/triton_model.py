"""Triton Inference Server model (Python backend, decoupled): text in, text out, streamed.

Input `text_input` (one UTF-8 string); output `text_output`. Sampling settings come as request
parameters with the runtime's names (in HTTP `generate` / `generate_stream` JSON they are
top-level keys or a "parameters" object; in gRPC, request parameters):
  max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos,
  stop (a string, or a JSON list of strings), stream (true: one response per text piece;
  false, the default: one response with the whole text, as `generate` requires),
  timeout_s (seconds after which the client no longer wants the answer).
An unknown parameter, a bad value, a missing or non-UTF-8 text, or a generation error (such as
non-finite logits) gets one error response, and the model goes on serving. Requests run on their
own threads (the model returns from `execute` at once) and join the generator's scheduler: every
request in flight shares each model step (continuous batching, up to the build's max_batch rows;
the rest wait for a free row).

Leaving clients: a cancelled gRPC request or a closed `generate_stream` connection is seen at
the next text piece (or within 50 ms while none comes) and its row is freed. A non-streaming
`generate` connection gives no such sign (Triton reads nothing from it until the reply is ready),
so such a request stops at its deadline: its `timeout_s`, or at the latest the model's
`generate_timeout_s` parameter (written by `persimmon-export triton --generate-timeout`). A
request whose deadline passes while it waits for a row is dropped without computing.

Metrics (with tritonserver --allow-metrics): counters persimmon_steps_total (model steps) and
persimmon_step_requests_total (requests advanced, summed over steps); their ratio is the mean
number of requests per step.
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

from .errors import PersimmonError, brief
from .generator import Generator
from .sampling import MAX_STOP_CHARS, MAX_STOPS

# the longest JSON list of allowed stops: each string escaped at most 6 characters a character
MAX_STOP_JSON_CHARS = MAX_STOPS * (6 * MAX_STOP_CHARS + 4) + 2

SAMPLING = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
            "repetition_penalty": float, "seed": int, "ignore_eos": bool}
CONTROL = ("stream", "stop", "timeout_s")


class RequestSettings(NamedTuple):
    stream: bool
    timeout_s: float | None   # None: the client set no deadline
    sampling: dict            # keyword arguments for Generator.stream



def parse_parameters(raw: str | dict | None) -> RequestSettings:
    """Request parameters (Triton's JSON text, or a dict) -> RequestSettings; PersimmonError names a bad one."""
    try:
        params = json.loads(raw) if isinstance(raw, str) and raw else raw or {}
    except json.JSONDecodeError as e:
        raise PersimmonError(f"request parameters are not JSON ({e.msg}); send an object of settings") from None
    except RecursionError:  # arrays nested thousands deep: no setting is
        raise PersimmonError("request parameters are nested too deep; send an object of settings") from None
    if not isinstance(params, dict):
        raise PersimmonError(f"request parameters {brief(params)} must be an object of settings")
    params = dict(params)
    stream = params.pop("stream", False)
    if not isinstance(stream, bool):
        raise PersimmonError(f"parameter stream={brief(stream)} must be true or false")
    timeout_s = params.pop("timeout_s", None)
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not 0 < timeout_s < math.inf):
        raise PersimmonError(f"parameter timeout_s={brief(timeout_s)} must be a number of seconds > 0")
    sampling = {}
    for name, value in params.items():
        if name == "stop":
            sampling["stop"] = _stop_list(value)
        elif name in SAMPLING:
            sampling[name] = _typed(name, value, SAMPLING[name])
        else:
            raise PersimmonError(f"unknown parameter {brief(name)}; known: {', '.join(CONTROL + tuple(SAMPLING))}")
    return RequestSettings(stream, None if timeout_s is None else float(timeout_s), sampling)


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


def text_input(values) -> str:
    if len(values) != 1:
        raise PersimmonError(f"text_input must hold exactly one string, got {len(values)}")
    value = values[0]
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PersimmonError(f"text_input is not UTF-8 (byte 0x{value[e.start]:02x} at offset {e.start}); "
                             f"send the prompt as UTF-8 text") from None


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


class _StepCounters:
    """The scheduler's on_step: two Prometheus counters through Triton's custom-metrics API."""

    def __init__(self, family, model: str):
        labels = {"model": model}
        self.families = [
            family(name="persimmon_steps_total", description="Model steps run by the scheduler", kind=family.COUNTER),
            family(name="persimmon_step_requests_total", kind=family.COUNTER,
                   description="Requests advanced by model steps, summed over steps (/ steps = mean batch)")]
        self.steps, self.requests = (f.Metric(labels=labels) for f in self.families)

    def __call__(self, request_count: int) -> None:
        self.steps.increment(1)
        self.requests.increment(request_count)

    def close(self) -> None:
        self.steps = self.requests = None  # a Metric must go before its MetricFamily
        self.families = []


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
        self.counters = _StepCounters(family, args["model_name"]) if family else None
        self.generator.scheduler.on_step = self.counters
        pb_utils.Logger.log_info(f"persimmon: {build_dir} on {self.generator.backend.name} ({device}), prefill "
                                 f"{self.generator.backend.prefill_kernels}")

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), daemon=True).start()
        return None

    def _serve(self, request) -> None:
        """Answer one request; whatever goes wrong becomes its error response, never a dead model."""
        sender = request.get_response_sender()
        try:
            self._generate(request, sender)
            error = None
        except PersimmonError as e:
            error = str(e)
        except Exception as e:  # a bug of ours: report it, log where, keep serving
            error = f"internal error: {e.__class__.__name__}: {e}"
            self.pb.Logger.log_error(f"persimmon: {traceback.format_exc()}")
        try:
            if error is None:
                sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(error)),
                            flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # the client is gone or the request already ended: nobody to tell
            self.pb.Logger.log_warn(f"persimmon: could not send the final response ({e}); request error: {error}")

    def _generate(self, request, sender) -> None:
        tensor = self.pb.get_input_tensor_by_name(request, "text_input")
        text = text_input(tensor.as_numpy().reshape(-1) if tensor is not None else [])
        settings = parse_parameters(request.parameters())
        deadline = _Deadline(settings, self.generate_timeout_s)
        if sender.is_cancelled():
            return
        stopped = []  # why should_stop said yes, if it did

        def should_stop() -> bool:  # asked between pieces and every 50 ms while waiting for one
            if sender.is_cancelled() or deadline.remaining() <= 0:
                stopped.append("cancelled" if sender.is_cancelled() else "deadline")
            return bool(stopped)

        # checks the request before any compute
        pieces = self.generator.stream(text, should_stop=should_stop, **settings.sampling)
        collected, characters = [], 0
        try:
            for piece in pieces:
                characters += len(piece)
                if settings.stream:
                    sender.send(self._response(piece))
                else:
                    collected.append(piece)
        finally:
            pieces.close()  # cancels the request now (freeing its row) unless it finished
        if stopped == ["cancelled"]:
            return
        if stopped:
            raise deadline.error(f"generated {characters} characters")
        if not settings.stream:
            sender.send(self._response("".join(collected)))

    def _response(self, text: str):
        return self.pb.InferenceResponse([self.pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=object))])

    def finalize(self):
        self.generator.close(timeout=30)  # in-flight requests end as cancelled; the step running finishes
        self.generator = None
        if self.counters is not None:
            self.counters.close()
