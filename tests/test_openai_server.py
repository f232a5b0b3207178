"""`persimmon-serve`: a real server process on 127.0.0.1 driven with the official `openai` client.

Greedy and seeded texts are compared with `Generator.generate` on the same build in this process
(the server's own library, a different process and request path); chats with transformers'
rendering of the build's chat template."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from conftest import make_overflow_build

from persimmon_runtime.chat import format_chat
from persimmon_runtime.generator import Generator

SERVE = os.path.join(os.path.dirname(sys.executable), "persimmon-serve")
MODEL = "tiny"
PROMPTS = ["The quick brown fox", "Once upon a time", "Hello, world", "A B C D", "1 2 3", "Persimmon is",
           "def main():", "Question: why?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """persimmon-serve on a free port of 127.0.0.1, started and stopped by the test."""

    def __init__(self, build: str, *flags: str, command=(SERVE,), env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([*command, build, "--port", str(self.port), "--served-model-name", MODEL,
                                         *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"persimmon-serve exited {self.process.returncode}: {self.process.stderr.read()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("persimmon-serve did not answer /health within 60 s")

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", **options)

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, timeout=10) as reply:
            return reply.status, reply.read().decode()

    def post(self, path: str, body: bytes, headers=None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json",
                                                                              **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metric(self, name: str) -> float:
        lines = [line for line in self.get("/metrics")[1].splitlines() if line.startswith(name + " ")]
        return float(lines[0].split()[1])

    def terminate(self) -> None:
        self.terminated = True
        self.process.send_signal(signal.SIGTERM)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        assert self.stop() == 0

    def stop(self) -> int:
        """SIGTERM (once: a second one would stop the wait for requests in flight) and its exit status."""
        if self.process.poll() is None and not getattr(self, "terminated", False):
            self.terminate()
        try:
            return self.process.wait(timeout=60)
        finally:
            self.process.stdout.close()
            self.process.stderr.close()


@pytest.fixture(scope="module")
def generator(tiny_build):
    loaded = Generator.load(tiny_build)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def server(tiny_build):
    running = Server(tiny_build)
    yield running
    assert running.stop() == 0


def test_greedy_completion_equals_the_generator(server, generator):
    reply = server.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    expected = generator.generate(PROMPTS[0], max_new_tokens=12)
    choice = reply.choices[0]
    assert (choice.text, choice.finish_reason, reply.object, reply.model) == (
        expected.text, "length" if len(expected.token_ids) == 12 else "stop", "text_completion", MODEL)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        expected.prompt_tokens, len(expected.token_ids), expected.prompt_tokens + len(expected.token_ids))
    # OpenAI's default for /v1/completions is 16 tokens; a seeded sample is the Generator's seeded sample
    seeded = server.client().completions.create(model=MODEL, prompt=PROMPTS[1], seed=7, temperature=0.8, top_p=0.9)
    assert seeded.choices[0].text == generator.generate(PROMPTS[1], max_new_tokens=16, seed=7, temperature=0.8,
                                                        top_p=0.9).text
    assert seeded.usage.completion_tokens <= 16


def test_streamed_text_equals_the_whole_reply(server):
    client = server.client()
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=10, temperature=0, stream=True))
    whole_chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=10, temperature=0)
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == whole_chat.choices[0].message.content


def test_chat_goes_through_the_builds_template_as_transformers_renders_it(server, generator, tiny_build):
    import transformers

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy? ünïcödé"}]
    rendered = transformers.AutoTokenizer.from_pretrained(tiny_build).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert rendered == format_chat(messages) == (
        "Answer briefly.\n\nhuman: Capital of France?\n\nadept: Paris.\n\nhuman: And of Italy? ünïcödé\n\nadept:")
    reply = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == generator.generate(rendered, max_new_tokens=8).text
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    # no max_tokens: the rest of the build's context, as vLLM does
    rest = server.client().chat.completions.create(model=MODEL, messages=messages[1:2], temperature=0)
    room = 96 - rest.usage.prompt_tokens  # the tiny build's kv_capacity, less the prompt
    assert rest.usage.completion_tokens == len(generator.generate(format_chat(messages[1:2]),
                                                                  max_new_tokens=room).token_ids)


def test_eight_concurrent_clients_each_get_their_own_text(server, generator):
    results, errors = {}, []

    def ask(index):
        try:
            reply = server.client().completions.create(model=MODEL, prompt=PROMPTS[index], max_tokens=10,
                                                       temperature=0.7, seed=index)
            results[index] = reply.choices[0].text
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert results == {i: generator.generate(PROMPTS[i], max_new_tokens=10, temperature=0.7, seed=i).text
                       for i in range(8)}


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=2), "n=2 is not supported"),
    (dict(extra_body={"best_of_n": 3}), "unrecognized request argument supplied: best_of_n"),
    (dict(extra_body={"temperature": "hot"}), "temperature must be a number"),
    (dict(temperature=-1), "temperature=-1"),
    (dict(max_tokens=500), "exceeds the build's kv_capacity 96"),
    (dict(stop=["a"] * 40), "stop has 40 strings"),
    (dict(logprobs=2), "logprobs=2 is not supported"),
])
def test_bad_parameters_are_400_in_openais_error_shape(server, kwargs, message):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client(max_retries=0).completions.create(model=MODEL, prompt="hi", **kwargs)
    assert message in raised.value.body["message"] and raised.value.body["type"] == "invalid_request_error"


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, generator):
    client = server.client(max_retries=0)
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-4' does not exist"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="turns must alternate"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])
    assert server.post("/v1/completions", b"{not json")[0] == 400
    assert server.post("/v1/completions", b"[1, 2]") == (400, {"error": {
        "message": "the body must be a JSON object", "type": "invalid_request_error", "param": None, "code": None}})
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for length in (2 << 20, 99999999999):  # refused from Content-Length, before a byte of the body
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(head + b"Content-Length: %d\r\n\r\n" % length)
            reply = _reply(connection)
            assert reply.startswith(b"HTTP/1.1 413") and b"larger than 1048576 bytes" in reply
    with socket.create_connection(("127.0.0.1", server.port)) as connection:  # no length: counted as it comes
        connection.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(17):  # 17 x 64 KiB: past 1 MiB at the 17th chunk (the test stops sending there)
            connection.sendall(b"10000\r\n" + b"x" * 65536 + b"\r\n")
        assert connection.recv(65536).startswith(b"HTTP/1.1 413")
    after = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=6, temperature=0)
    assert after.choices[0].text == generator.generate(PROMPTS[3], max_new_tokens=6).text
    metrics = server.get("/metrics")[1]
    assert 'persimmon_requests_total{endpoint="/v1/completions",status="413"} 3' in metrics
    assert 'persimmon_requests_total{endpoint="/v1/completions",status="404"} 1' in metrics


@pytest.fixture(scope="module")
def long_build(tmp_path_factory):
    """A tiny model with room for 2000 new tokens: a request that is surely still running when its
    client leaves."""
    from persimmon_export.build import build
    from persimmon_export.demo import make_demo_checkpoint
    from persimmon_export.options import BuildOptions

    root = tmp_path_factory.mktemp("long")
    checkpoint = make_demo_checkpoint(str(root / "ckpt"), seed=5, max_position_embeddings=2048)
    build(checkpoint, str(root / "build"), BuildOptions(dtype="float32", max_batch=2, kv_capacity=2048,
                                                        backend="onnxruntime"))
    return str(root / "build")


def test_a_client_that_disconnects_cancels_its_request(long_build):
    running = Server(long_build)
    try:
        for count, stream in enumerate((True, False), start=1):
            body = json.dumps({"model": MODEL, "prompt": PROMPTS[4], "max_tokens": 2000, "ignore_eos": True,
                               "stream": stream}).encode()
            with socket.create_connection(("127.0.0.1", running.port)) as connection:
                connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
                if stream:
                    assert connection.recv(65536).startswith(b"HTTP/1.1 200")
                deadline = time.monotonic() + 10
                while running.metric("persimmon_requests_in_flight") < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert running.metric("persimmon_requests_in_flight") == 1
            deadline = time.monotonic() + 10
            while running.metric("persimmon_requests_in_flight") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert running.metric("persimmon_requests_in_flight") == 0
            assert running.metric("persimmon_requests_cancelled_total") == count
        assert running.metric("persimmon_generation_tokens_total") == 0  # neither ran to its 2000 tokens
        reply = running.client().completions.create(model=MODEL, prompt="ok", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1  # the rows were freed: the server serves normally
    finally:
        assert running.stop() == 0


def test_models_health_and_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert json.loads(server.get("/health")[1]) == {"status": "ok"}
    text = server.get("/metrics")[1]
    assert "# TYPE persimmon_requests_total counter" in text and "persimmon_generation_tokens_total" in text


def test_a_full_queue_is_503_and_sigterm_finishes_what_is_in_flight(long_build):
    running = Server(long_build, "--max-queue", "0")  # max_batch 2: a third request finds no room
    try:
        replies, started = [], threading.Event()

        def long_request():
            started.set()
            replies.append(running.client(max_retries=0).completions.create(
                model=MODEL, prompt="x", max_tokens=1000, extra_body={"ignore_eos": True}))

        threads = [threading.Thread(target=long_request) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while running.metric("persimmon_requests_in_flight") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.APIStatusError) as raised:
            running.client(max_retries=0).completions.create(model=MODEL, prompt="y", max_tokens=2)
        assert raised.value.status_code == 503 and "busy" in raised.value.body["message"]
        assert running.metric("persimmon_generation_tokens_total") == 0  # neither has finished yet
        running.terminate()  # while both are generating
        for thread in threads:
            thread.join(60)
        assert [r.usage.completion_tokens for r in replies] == [1000, 1000]
    finally:
        assert running.stop() == 0


def test_bad_command_lines_are_one_line(tiny_build, tmp_path):
    for argv, message in (([str(tmp_path / "missing")], "manifest.json: not found"),
                          ([tiny_build, "--max-queue", "-1"], "--max-queue must be in 0..")):
        result = subprocess.run([SERVE, *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_server_runs_on_the_declared_floors(tiny_build, generator):
    """starlette, uvicorn and jinja2 at pyproject.toml's minimums (examples/setup.sh's venv-floors,
    runtime-only: no torch), this checkout's runtime on its path."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = os.path.join(root, ".cache", "venv-floors", "bin", "python")
    if not os.path.isfile(python):
        pytest.skip("the floors venv is missing: examples/setup.sh makes it")
    env = {**os.environ, "PYTHONPATH": os.path.join(root, "runtime")}
    versions = subprocess.run([python, "-c", "import json, starlette, uvicorn, jinja2; print(json.dumps("
                               "[starlette.__version__, uvicorn.__version__, jinja2.__version__]))"],
                              capture_output=True, text=True, env=env, timeout=60)
    with open(os.path.join(root, "pyproject.toml")) as f:
        declared = f.read()
    floors = [re.search(rf'"{name}>=([0-9.]+)"', declared).group(1) for name in ("starlette", "uvicorn", "jinja2")]
    def release(version):  # "0.40" and "0.40.0" are the same release
        parts = [int(part) for part in version.split(".")]
        return parts + [0] * (3 - len(parts))

    assert [release(v) for v in json.loads(versions.stdout)] == [release(v) for v in floors]
    running = Server(tiny_build, command=(python, "-m", "persimmon_runtime.serve"), env=env)
    try:
        client = running.client()
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == generator.generate(format_chat("Hi"), max_new_tokens=8).text
        pieces = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in pieces) == generator.generate(PROMPTS[5], max_new_tokens=8).text
    finally:
        assert running.stop() == 0


def _raw_request(port: int, body: dict) -> socket.socket:
    """A request sent over a socket the test holds (and can close: a client leaving)."""
    data = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return connection


def _reply(connection: socket.socket) -> bytes:
    """A whole HTTP reply with a Content-Length (its head and body may come in separate packets)."""
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < int(
            reply.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0):
        piece = connection.recv(65536)
        if not piece:
            break
        reply += piece
    return reply


def _wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_queued_stream_whose_client_leaves_frees_its_place_at_once(long_build):
    long = {"model": MODEL, "prompt": "x", "max_tokens": 2000, "ignore_eos": True}
    with Server(long_build) as running:  # max_batch 2
        in_flight = lambda count: lambda: running.metric("persimmon_requests_in_flight") == count  # noqa: E731
        busy = [_raw_request(running.port, long) for _ in range(2)]  # both rows, for seconds
        assert _wait_for(in_flight(2))
        queued = _raw_request(running.port, {**long, "stream": True})
        assert _wait_for(in_flight(3))
        queued.close()  # it never got a row
        assert _wait_for(in_flight(2), seconds=2)
        for connection in busy:
            connection.close()
        assert _wait_for(in_flight(0))


def test_concurrent_arrivals_cannot_pass_the_queue_limit_together(long_build):
    request = {"model": MODEL, "prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with Server(long_build, "--max-queue", "0") as running:  # room for 2
        connections = [_raw_request(running.port, request) for _ in range(8)]
        assert sorted(int(c.recv(65536).split(b" ")[1]) for c in connections) == [200, 200] + [503] * 6
        for connection in connections:
            connection.close()
        assert _wait_for(lambda: running.metric("persimmon_requests_in_flight") == 0)


def test_a_model_that_fails_mid_request_is_a_server_error(tmp_path_factory):
    """Logits that overflow float32: the generator refuses them mid-request."""
    with Server(make_overflow_build(str(tmp_path_factory.mktemp("overflow")))) as running:
        with pytest.raises(openai.InternalServerError) as raised:
            running.client(max_retries=0).completions.create(model=MODEL, prompt="hi", max_tokens=4)
        assert "NaN/inf logits" in raised.value.body["message"] and raised.value.body["type"] == "server_error"
        events = [line for line in urllib.request.urlopen(urllib.request.Request(
            running.url + "/v1/completions", data=json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4,
                                                              "stream": True}).encode(),
            headers={"Content-Type": "application/json"}), timeout=30).read().decode().splitlines() if line]
        assert "NaN/inf logits" in json.loads(events[-1].removeprefix("data: "))["error"]["message"]
        assert "data: [DONE]" not in events  # a failed stream does not look complete
