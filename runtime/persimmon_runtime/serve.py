"""`persimmon-serve BUILD`: an OpenAI-compatible HTTP server over the Generator's continuous batching.

POST /v1/completions and /v1/chat/completions (whole, or streamed as server-sent events ending in
`data: [DONE]`), GET /v1/models, /health and Prometheus /metrics, with OpenAI's parameter names,
response objects and error object. Requests share the build's rows through the Generator's
scheduler; one that finds max_batch + --max-queue requests in flight gets 503. A body is refused
(413) past --max-body-bytes before it is parsed. A client that disconnects cancels its request.
SIGTERM or Ctrl-C: stop accepting, let the requests in flight finish (up to --shutdown-timeout),
exit 0. Needs the `serve` extra (starlette, uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
import uuid

from .backends import BACKEND_CHOICES
from .console import add_verbosity_flags, configure_logging, run_command
from .cpu import PREFILL_CHOICES
from .errors import PersimmonError
from .generator import Completion, Generator
from .openai_protocol import FINISH_REASONS, RequestError, chat_prompt, completion_prompt, sampling_settings

log = logging.getLogger(__name__)
SERVE_EXTRA = "pip install '.[serve]' in a persimmon-deploy checkout (starlette and uvicorn)"


class Metrics:
    """Counters for /metrics (Prometheus text format), kept on the event loop's thread."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.completion_tokens = self.in_flight = self.cancelled = 0

    def count(self, endpoint: str, status: int) -> None:
        self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

    def text(self) -> str:
        lines = ["# HELP persimmon_requests_total Requests answered, by endpoint and HTTP status.",
                 "# TYPE persimmon_requests_total counter"]
        lines += [f'persimmon_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}'
                  for (endpoint, status), count in sorted(self.requests.items())]
        for name, kind, value, meaning in (
                ("prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens of finished requests."),
                ("generation_tokens_total", "counter", self.completion_tokens, "Tokens generated."),
                ("requests_in_flight", "gauge", self.in_flight, "Requests generating or waiting for a row."),
                ("requests_cancelled_total", "counter", self.cancelled,
                 "Requests stopped before their end: the client left or the server shut down.")):
            name = f"persimmon_{name}"
            lines += [f"# HELP {name} {meaning}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


class Slot:
    """One request's place in the in-flight count, released once (whichever path ends it)."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.held = metrics, True
        metrics.in_flight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.metrics.in_flight -= 1


def create_app(generator: Generator, model_name: str, max_queue: int = 64, max_body_bytes: int = 1 << 20):
    """The ASGI app (Starlette). The generator is closed when the app shuts down."""
    from anyio import CapacityLimiter, to_thread
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    class OwnedStream(StreamingResponse):
        """A streamed reply that releases its request's slot when the response ends, however it
        ends (finished, client gone before or during the stream, server shutdown)."""

        def __init__(self, content, slot: Slot, **kwargs):
            super().__init__(content, **kwargs)
            self.slot = slot

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.slot.release()

    abandon_on_cancel = _abandon_on_cancel(to_thread.run_sync)
    metrics = Metrics()
    most_in_flight = generator.manifest.max_batch + max_queue
    threads = CapacityLimiter(most_in_flight + 4)  # each request waits for its tokens on a thread

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
              code: str | None = None) -> JSONResponse:
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                            status_code=status, headers=headers)

    async def read_json(request) -> dict:
        too_large = RequestError(f"the request body is larger than {max_body_bytes} bytes", status=413)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise too_large
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise RequestError(f"the body is not valid JSON ({str(e)[:100]})") from None
        if not isinstance(parsed, dict):
            raise RequestError("the body must be a JSON object")
        return parsed

    async def generate(request, chat: bool):
        endpoint, response = request.url.path, None
        if metrics.in_flight >= most_in_flight:
            response = error(503, f"the server is busy ({metrics.in_flight} requests in flight); retry later",
                             kind="server_busy")
            metrics.count(endpoint, 503)
            return response
        slot = Slot(metrics)  # taken before any await: concurrent arrivals cannot all pass the check
        try:
            body = await read_json(request)
            if body.get("model", model_name) != model_name:
                response = error(404, f"the model {body.get('model')!r} does not exist; this server serves "
                                      f"{model_name!r}", param="model", code="model_not_found")
                return response
            prompt = chat_prompt(body, generator.manifest) if chat else completion_prompt(body)
            settings, stream, include_usage = sampling_settings(body, chat, generator, prompt)
            gone, finished = threading.Event(), []
            # checks the request (bad input raises here); it is queued at the first piece asked for
            pieces = generator.stream(prompt, should_stop=gone.is_set, on_finish=finished.append, **settings)
            if stream:
                response = OwnedStream(events(pieces, finished, gone, chat, include_usage), slot,
                                       media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            else:
                response = JSONResponse(await whole(request, pieces, finished, gone, chat))
            return response
        except RequestError as e:
            response = error(e.status, str(e), kind=e.kind, param=e.param)
            return response
        except PersimmonError as e:  # the request's own values, refused before any compute
            response = error(400, str(e))
            return response
        finally:
            metrics.count(endpoint, 500 if response is None else response.status_code)
            if not isinstance(response, OwnedStream):
                slot.release()  # a stream's slot is released when its response ends

    async def next_piece(pieces):
        """The next text piece (None at the end), waited for on a worker thread. A cancelled wait
        (the client left) returns at once; the thread sees `gone` within 50 ms and frees the row."""
        return await to_thread.run_sync(next, pieces, None, limiter=threads, **abandon_on_cancel)

    async def whole(request, pieces, finished, gone, chat: bool) -> dict:
        watcher = asyncio.ensure_future(watch_disconnect(request, gone))
        try:
            while await next_piece(pieces) is not None:
                pass
        except PersimmonError as e:  # the model failed mid-request: not the client's fault
            raise RequestError(f"generation failed: {e}", status=500, kind="server_error") from None
        finally:
            watcher.cancel()
            gone.set()
            done(finished)
        if _ended(finished) is None:
            raise RequestError("the request was cancelled (the server is shutting down)", status=503,
                               kind="server_error")
        return response_object(finished[0], chat)

    async def events(pieces, finished, gone, chat: bool, include_usage: bool):
        ident, created = _ident(chat), int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict, **extra) -> str:
            document = {"id": ident, "object": kind, "created": created, "model": model_name,
                        "choices": [] if choice is None else [{"index": 0, **choice}], **extra}
            return f"data: {json.dumps(document, ensure_ascii=False)}\n\n"

        def failure(message: str) -> str:  # what OpenAI streams when a request fails after its first chunk
            document = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
            return f"data: {json.dumps(document)}\n\n"

        try:
            if chat:
                yield chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
            while (piece := await next_piece(pieces)) is not None:
                text = {"delta": {"content": piece}} if chat else {"text": piece}
                yield chunk({**text, "logprobs": None, "finish_reason": None})
        except PersimmonError as e:
            yield failure(f"generation failed: {e}")
            return
        finally:  # the client left (this generator is cancelled) or the stream ended: free the row
            gone.set()
            done(finished)
        if (completion := _ended(finished)) is None:  # cancelled by a shutdown
            yield failure("the request was cancelled (the server is shutting down)")
            return
        last = {"delta": {}} if chat else {"text": ""}
        yield chunk({**last, "logprobs": None, "finish_reason": FINISH_REASONS[completion.finish_reason]})
        if include_usage:
            yield chunk(None, usage=usage(completion))
        yield "data: [DONE]\n\n"

    def done(finished: list) -> None:
        if (completion := _ended(finished)) is None:
            metrics.cancelled += 1
        else:
            metrics.prompt_tokens += completion.prompt_tokens
            metrics.completion_tokens += len(completion.token_ids)

    def response_object(completion: Completion, chat: bool) -> dict:
        reason = FINISH_REASONS[completion.finish_reason]
        choice = ({"index": 0, "message": {"role": "assistant", "content": completion.text}, "logprobs": None,
                   "finish_reason": reason} if chat else
                  {"index": 0, "text": completion.text, "logprobs": None, "finish_reason": reason})
        return {"id": _ident(chat), "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model_name, "choices": [choice], "usage": usage(completion)}

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                                         "owned_by": "persimmon-deploy"}]})

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def prometheus(request):
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await to_thread.run_sync(generator.close, 10.0)  # cancels whatever is left, waits for the model

    started = int(time.time())
    routes = [Route("/v1/completions", functools.partial(generate, chat=False), methods=["POST"]),
              Route("/v1/chat/completions", functools.partial(generate, chat=True), methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)


def _abandon_on_cancel(run_sync) -> dict:
    """The keyword that lets a cancelled `anyio.to_thread.run_sync` return at once: anyio >= 4.1
    calls it abandon_on_cancel, older releases cancellable."""
    import inspect

    parameters = inspect.signature(run_sync).parameters
    return {"abandon_on_cancel": True} if "abandon_on_cancel" in parameters else {"cancellable": True}


async def watch_disconnect(request, gone: threading.Event, poll_s: float = 0.1) -> None:
    """Set `gone` once the client of a whole (non-streamed) request disconnects."""
    while not gone.is_set():
        if await request.is_disconnected():
            gone.set()
            return
        await asyncio.sleep(poll_s)


def _ended(finished: list) -> Completion | None:
    """The request's Completion if it ran to its end (an end token, a stop string, max_tokens);
    None if it was cancelled (its client left, the server shut down) before it finished."""
    return finished[0] if finished and finished[0].finish_reason in FINISH_REASONS else None


def usage(completion: Completion) -> dict:
    generated = len(completion.token_ids)
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": generated,
            "total_tokens": completion.prompt_tokens + generated}


def _ident(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def serve(args) -> None:
    try:
        import uvicorn
    except ImportError:
        raise PersimmonError(f"persimmon-serve needs uvicorn and starlette, which this install lacks: "
                             f"{SERVE_EXTRA}") from None
    generator = Generator.load(args.build, backend=args.backend, device=args.device, prefill=args.prefill)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.build))
    app = create_app(generator, name, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=logging.getLevelName(
        logging.getLogger("persimmon_runtime").getEffectiveLevel()).lower(), lifespan="on",
        timeout_graceful_shutdown=args.shutdown_timeout)
    server = _server(config)
    log.info(f"serving {args.build} as model {name!r} at http://{args.host}:{args.port}/v1 "
             f"({generator.backend.name}; SIGTERM or Ctrl-C stops)")
    def stop(signum, frame):  # the first signal: finish what is in flight; a second: stop waiting for it
        server.force_exit = server.should_exit
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        generator.close()


def _server(config):
    """uvicorn's Server with our own signal handling: a signal asks it to exit gracefully and the
    process then exits 0 (uvicorn would re-raise the signal once it has shut down)."""
    import uvicorn

    class Server(uvicorn.Server):
        def install_signal_handlers(self):  # uvicorn < 0.29
            pass

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn >= 0.29
            yield

    return Server(config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persimmon-serve",
        description="Serve a build over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models; "
                    "/health, /metrics) with continuous batching. Needs the serve extra (starlette, uvicorn).")
    parser.add_argument("build", help="build directory (from `persimmon-export build`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                                                            "machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--served-model-name", help="the model name clients send (default: the build "
                                                    "directory's name)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="runtime backend (default auto)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the backend's)")
    parser.add_argument("--prefill", choices=PREFILL_CHOICES, default="auto",
                        help="prompt steps on the build's int8 prefill graph: auto (default) where the CPU has "
                             "AMX-INT8/AVX512-VNNI/AVX-VNNI, int8 always, off never")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for a row beyond the build's max_batch; more get 503 "
                             "(default 64)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="largest request body; larger ones get 413 before parsing (default 1 MiB)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    add_verbosity_flags(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbosity)
    for flag, value, low, high in (("--max-queue", args.max_queue, 0, 1 << 20),
                                   ("--max-body-bytes", args.max_body_bytes, 1024, 1 << 40),
                                   ("--port", args.port, 0, 65535)):
        if not low <= value <= high:
            return run_command("persimmon-serve", lambda: _refuse(f"{flag} must be in {low}..{high}, got {value}"))
    return run_command("persimmon-serve", lambda: serve(args))


def _refuse(message: str):
    raise PersimmonError(message)


if __name__ == "__main__":
    raise SystemExit(main())
