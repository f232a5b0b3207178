"""Triton Inference Server model (Python backend, decoupled): text in, text out, streamed.

Input `text_input` (one string); output `text_output`. Sampling settings come as request
parameters with the runtime's names (in HTTP `generate` / `generate_stream` JSON they are
top-level keys or a "parameters" object; in gRPC, request parameters):
  max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos,
  stop (a string, or a JSON list of strings), stream (true: one response per text piece;
  false, the default: one response with the whole text, as `generate` requires).
An unknown parameter, a bad value or a missing text gets an error response; a cancelled
request stops generating at the next piece. Requests run on their own threads (the model
returns from `execute` at once) and share the generator one at a time.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np

from .errors import PersimmonError
from .generator import Generator

SAMPLING = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
            "repetition_penalty": float, "seed": int, "ignore_eos": bool}


def parse_parameters(raw: str | dict | None) -> tuple[bool, dict]:
    """Request parameters -> (stream, sampling kwargs); PersimmonError names a bad one."""
    params = json.loads(raw) if isinstance(raw, str) and raw else dict(raw or {})
    stream = params.pop("stream", False)
    if not isinstance(stream, bool):
        raise PersimmonError(f"parameter stream={stream!r} must be true or false")
    sampling = {}
    for name, value in params.items():
        if name == "stop":
            stops = json.loads(value) if isinstance(value, str) and value.startswith("[") else value
            sampling["stop"] = [stops] if isinstance(stops, str) else stops
        elif name in SAMPLING:
            kind = SAMPLING[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise PersimmonError(f"parameter {name}={value!r} must be {kind.__name__}")
            sampling[name] = value
        else:
            raise PersimmonError(f"unknown parameter {name!r}; known: stream, stop, {', '.join(SAMPLING)}")
    return stream, sampling


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        build_dir = os.path.join(args["model_repository"], args["model_version"], params.get("build_dir", "build"))
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu"
        backend = params.get("backend", "auto")
        self.generator = Generator.load(build_dir, backend=backend, device=device)
        self.lock = threading.Lock()
        pb_utils.Logger.log_info(f"persimmon: {build_dir} on {self.generator.backend.name} ({device})")

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), daemon=True).start()
        return None

    def _serve(self, request) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        try:
            tensor = pb.get_input_tensor_by_name(request, "text_input")
            values = tensor.as_numpy().reshape(-1) if tensor is not None else []
            if len(values) != 1:
                raise PersimmonError("text_input must hold exactly one string")
            text = values[0].decode("utf-8") if isinstance(values[0], bytes) else str(values[0])
            stream, sampling = parse_parameters(request.parameters())
            with self.lock:
                pieces = self.generator.stream(text, **sampling)  # checks the request before any compute
                collected = []
                for piece in pieces:
                    if sender.is_cancelled():
                        pieces.close()
                        break
                    if stream:
                        sender.send(self._response(piece))
                    else:
                        collected.append(piece)
                if not stream and not sender.is_cancelled():
                    sender.send(self._response("".join(collected)))
            sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except PersimmonError as e:
            sender.send(pb.InferenceResponse(error=pb.TritonError(str(e))), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # never leave a request without its final response
            sender.send(pb.InferenceResponse(error=pb.TritonError(f"internal error: {e.__class__.__name__}: {e}")),
                        flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _response(self, text: str):
        return self.pb.InferenceResponse([self.pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=object))])

    def finalize(self):
        self.generator = None
