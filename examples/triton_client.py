"""Talk to the Persimmon model in Triton: generate, generate_stream (HTTP) and gRPC streaming.

    python examples/triton_client.py --url 127.0.0.1:8000 --chat "What is the capital of France?"
    python examples/triton_client.py "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1 --stop "\n\n"

Uses only the standard library for HTTP; `--grpc 127.0.0.1:8001` needs `pip install tritonclient[grpc]`.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request


class ServerError(Exception):
    """The server's own error line (a bad parameter, a prompt too long, ...)."""


def _post(request, timeout=None):
    """urlopen, with an HTTP error turned into the server's {"error": ...} message."""
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace").strip()
        try:  # {"error": ...}, or as one server-sent event from generate_stream
            message = json.loads(body.removeprefix("data: ")).get("error", e.reason)
        except (ValueError, AttributeError):
            message = e.reason
        raise ServerError(f"HTTP {e.code}: {message}") from None


def generate(url: str, model: str, prompt: str, timeout: float = 300, **parameters) -> str:
    """The whole completion in one reply. The server cannot see this client leave, so it is told
    how long the client waits (timeout_s) and stops generating then instead of computing for nobody."""
    body = json.dumps({"text_input": prompt, "timeout_s": timeout, **parameters}).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    with _post(request, timeout) as response:
        return json.loads(response.read())["text_output"]


def generate_stream(url: str, model: str, prompt: str, **parameters):
    """Yield text pieces from the server-sent events of generate_stream."""
    body = json.dumps({"text_input": prompt, "stream": True, **parameters}).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate_stream", data=body,
                                     headers={"Content-Type": "application/json"})
    with _post(request) as response:
        for line in response:
            if line.startswith(b"data: "):
                event = json.loads(line[len(b"data: "):])
                if "error" in event:
                    raise ServerError(event["error"])
                yield event["text_output"]


def grpc_stream(url: str, model: str, prompt: str, **parameters):
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    pieces: queue.Queue = queue.Queue()

    def callback(result, error):
        if error:
            pieces.put(error)
            return
        response = result.get_response()
        if response.outputs:
            pieces.put(result.as_numpy("text_output")[0].decode())
        final = response.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            pieces.put(None)  # the empty final response: the stream of this request is complete

    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=callback)
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    client.async_stream_infer(model, [text], parameters={"stream": True, **parameters},
                              enable_empty_final_response=True)
    try:
        while (item := pieces.get(timeout=300)) is not None:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        client.stop_stream()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--url", default="127.0.0.1:8000", help="HTTP host:port")
    parser.add_argument("--grpc", help="gRPC host:port: stream over gRPC instead of HTTP")
    parser.add_argument("--model", default="persimmon")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user turn: the server renders it with the build's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")
    args = parser.parse_args()
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "chat": args.chat}
    settings.update({k: v for k, v in (("top_p", args.top_p), ("seed", args.seed)) if v is not None})
    if args.stop:  # a JSON list in one string: request parameters are scalars over gRPC
        settings["stop"] = json.dumps(args.stop)
    stream = grpc_stream(args.grpc, args.model, args.prompt, **settings) if args.grpc else \
        generate_stream(args.url, args.model, args.prompt, **settings)
    try:
        for piece in stream:
            print(piece, end="", flush=True)
    except (ServerError, OSError) as e:
        sys.exit(f"\nerror: {e}")
    print()


if __name__ == "__main__":
    main()
