"""Talk to the Persimmon model in Triton: generate, generate_stream (HTTP) and gRPC streaming.

    python examples/triton_client.py --url 127.0.0.1:8000 "What is the capital of France?"

Uses only the standard library for HTTP; `--grpc 127.0.0.1:8001` needs `pip install tritonclient[grpc]`.
"""

import argparse
import json
import urllib.request


def generate(url: str, model: str, prompt: str, timeout: float = 300, **parameters) -> str:
    """The whole completion in one reply. The server cannot see this client leave, so it is told
    how long the client waits (timeout_s) and stops generating then instead of computing for nobody."""
    body = json.dumps({"text_input": prompt, "timeout_s": timeout, **parameters}).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["text_output"]


def generate_stream(url: str, model: str, prompt: str, **parameters):
    """Yield text pieces from the server-sent events of generate_stream."""
    body = json.dumps({"text_input": prompt, "stream": True, **parameters}).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate_stream", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        for line in response:
            if line.startswith(b"data: "):
                event = json.loads(line[len(b"data: "):])
                if "error" in event:
                    raise RuntimeError(event["error"])
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
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    prompt = f"human: {args.prompt}\n\nadept:"
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    stream = grpc_stream(args.grpc, args.model, prompt, **settings) if args.grpc else \
        generate_stream(args.url, args.model, prompt, **settings)
    for piece in stream:
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
