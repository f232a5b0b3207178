"""Triton Inference Server: the generated repository, served by a real tritonserver on 127.0.0.1.

The server is the binary bundled in nvidia-pytriton's wheel, unpacked by examples/setup.sh into
.cache/tritonserver (CPU, Python backend only). Each test module run starts it and stops it by PID.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from google.protobuf import text_format

from persimmon_export.build import build
from persimmon_export.demo import make_demo_checkpoint
from persimmon_export.triton import write_repository
from persimmon_runtime import PersimmonError
from persimmon_runtime.generator import Generator
from persimmon_runtime.triton_model import parse_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, ".cache", "tritonserver", "pytriton", "tritonserver")
LIBS = os.path.join(ROOT, ".cache", "tritonserver", "nvidia_pytriton.libs")
MODEL_PYTHON = os.path.join(ROOT, ".cache", "triton-python")
PROMPTS = ["human: What is the capital of France?\n\nadept:", "The quick brown fox", "東京", "1 2 3"]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    checkpoint = make_demo_checkpoint(str(root / "ckpt"), seed=5)
    out = str(root / "build")
    build(checkpoint, out, dtype="float32", backend="onnxruntime", max_batch=2, max_seq=128,
          progress=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def repository(build_dir, tmp_path_factory):
    repo = str(tmp_path_factory.mktemp("repo") / "models")
    assert write_repository(build_dir, repo, instances=1, progress=lambda *_: None) == ["persimmon"]
    return repo


def test_config_pbtxt_is_valid_for_triton(repository):
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(open(os.path.join(repository, "persimmon", "config.pbtxt")).read(),
                               model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.model_transaction_policy.decoupled
    assert [i.name for i in config.input] == ["text_input"] and [o.name for o in config.output] == ["text_output"]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert os.path.isfile(os.path.join(repository, "persimmon", "1", "build", "manifest.json"))


def test_engine_model_config_is_valid_for_triton(build_dir, tmp_path):
    from tritonclient.grpc import model_config_pb2

    from persimmon_export.triton import engine_config
    from persimmon_runtime.manifest import Manifest

    manifest = Manifest.load(build_dir)
    manifest.tensorrt = {"profiles": [{}, {}]}  # what a TensorRT build adds; the I/O comes from the manifest
    config = text_format.Parse(engine_config("persimmon_engine", manifest), model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and list(config.instance_group[0].profile) == ["0", "1"]
    assert [i.name for i in config.input] == [s["name"] for s in manifest.inputs]
    assert list(config.input[0].dims) == [-1, -1]
    for spec, tensor in zip(manifest.inputs, config.input):
        assert list(tensor.dims) == [d if isinstance(d, int) else -1 for d in spec["shape"]]
    assert config.output[0].data_type == model_config_pb2.TYPE_FP32


def test_request_parameters_are_checked():
    assert parse_parameters('{"max_new_tokens": 4, "temperature": 1, "stop": "[\\"a\\", \\"b\\"]", "stream": true}') \
        == (True, {"max_new_tokens": 4, "temperature": 1.0, "stop": ["a", "b"]})
    with pytest.raises(PersimmonError, match="unknown parameter 'bogus'"):
        parse_parameters({"bogus": 1})
    with pytest.raises(PersimmonError, match="max_new_tokens='4' must be int"):
        parse_parameters({"max_new_tokens": "4"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    binary = os.path.join(SERVER, "bin", "tritonserver")
    stub = os.path.join(SERVER, "python_backend_stubs", f"{sys.version_info.major}.{sys.version_info.minor}",
                        "triton_python_backend_stub")
    if not (os.path.isfile(binary) and os.path.isfile(stub) and os.path.isdir(MODEL_PYTHON)):
        pytest.skip("no tritonserver in .cache (examples/setup.sh fetches it on Linux x86_64)")
    backends = tmp_path_factory.mktemp("backends")
    shutil.copytree(os.path.join(SERVER, "backends", "python"), backends / "python")
    shutil.copy2(stub, backends / "python")
    http, grpc = _free_port(), _free_port()
    log = open(tmp_path_factory.mktemp("log") / "tritonserver.log", "w+")
    env = {**os.environ, "LD_LIBRARY_PATH": LIBS,
           "PYTHONPATH": os.pathsep.join([MODEL_PYTHON, os.path.join(ROOT, "runtime")])}
    process = subprocess.Popen([binary, "--model-repository", repository, "--backend-directory", str(backends),
                                "--http-address", "127.0.0.1", "--http-port", str(http), "--grpc-address",
                                "127.0.0.1", "--grpc-port", str(grpc), "--allow-metrics", "false"],
                               stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 90
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"tritonserver exited with {process.returncode}:\n{log.read()[-3000:]}")
            try:
                if urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"tritonserver not ready after 90 s:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield {"http": url, "grpc": f"127.0.0.1:{grpc}", "process": process}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


def post(server, endpoint: str, body: dict):
    """(status, [json events]) for generate (one object) or generate_stream (server-sent events)."""
    request = urllib.request.Request(f"{server['http']}/v2/models/persimmon/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as e:
        return e.code, [json.loads(e.read().decode())]
    if endpoint == "generate_stream":
        return status, [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    return status, [json.loads(text)]


@pytest.fixture(scope="module")
def local(build_dir):
    return Generator.load(build_dir)


def test_generate_equals_the_in_process_runtime(server, local):
    settings = {"max_new_tokens": 16, "temperature": 0.8, "top_p": 0.9, "seed": 3}
    status, [reply] = post(server, "generate", {"text_input": PROMPTS[0], **settings})
    assert status == 200, reply
    assert reply["text_output"] == local.generate(PROMPTS[0], **settings).text


def test_generate_stream_yields_the_same_text_in_pieces(server, local):
    settings = {"max_new_tokens": 20, "ignore_eos": True}
    status, events = post(server, "generate_stream", {"text_input": PROMPTS[1], "stream": True, **settings})
    assert status == 200 and all("error" not in e for e in events), events
    pieces = [e["text_output"] for e in events]
    assert len(pieces) > 1
    assert "".join(pieces) == local.generate(PROMPTS[1], **settings).text


def test_sixteen_concurrent_requests_all_complete_correctly(server, local):
    bodies = [{"text_input": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 8 + i % 5, "temperature": 0.7, "seed": i}
              for i in range(16)]
    results = [None] * 16

    def send(i):
        results[i] = post(server, "generate", bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for body, (status, [reply]) in zip(bodies, results):
        assert status == 200, reply
        expected = local.generate(body["text_input"], **{k: v for k, v in body.items() if k != "text_input"}).text
        assert reply["text_output"] == expected


@pytest.mark.parametrize("body,message", [
    ({"max_new_tokens": 4}, "text_input"),
    ({"text_input": "hi", "max_new_tokens": -3}, "max_new_tokens=-3"),
    ({"text_input": "hi", "frequency_penalty": 0.5}, "unknown parameter 'frequency_penalty'"),
])
def test_bad_requests_get_an_error_and_the_server_stays_up(server, local, body, message):
    status, [reply] = post(server, "generate", body)
    assert status >= 400 and message in reply["error"], reply
    assert server["process"].poll() is None
    status, [reply] = post(server, "generate", {"text_input": "hi", "max_new_tokens": 3})
    assert status == 200 and reply["text_output"] == local.generate("hi", max_new_tokens=3).text


def test_grpc_streaming(server, local):
    import tritonclient.grpc as grpcclient

    events = []

    def callback(result, error):
        events.append(error or result.as_numpy("text_output")[0].decode())

    client = grpcclient.InferenceServerClient(server["grpc"])
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPTS[2].encode()], dtype=object))
    client.start_stream(callback=callback)
    client.async_stream_infer("persimmon", [text], parameters={"stream": True, "max_new_tokens": 12,
                                                               "ignore_eos": True})
    deadline = time.monotonic() + 60
    expected = local.generate(PROMPTS[2], max_new_tokens=12, ignore_eos=True).text
    while "".join(e for e in events if isinstance(e, str)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    client.stop_stream()
    assert all(isinstance(e, str) for e in events), events
    assert "".join(events) == expected and len(events) > 1


def test_example_client(server, local):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import triton_client
    finally:
        sys.path.pop(0)
    url, prompt = server["http"].removeprefix("http://"), PROMPTS[3]
    expected = local.generate(prompt, max_new_tokens=10, ignore_eos=True).text
    assert triton_client.generate(url, "persimmon", prompt, max_new_tokens=10, ignore_eos=True) == expected
    assert "".join(triton_client.generate_stream(url, "persimmon", prompt, max_new_tokens=10, ignore_eos=True)) \
        == expected
    assert "".join(triton_client.grpc_stream(server["grpc"], "persimmon", prompt, max_new_tokens=10,
                                             ignore_eos=True)) == expected


def test_stop_strings_through_the_server(server, local):
    full = local.generate(PROMPTS[1], max_new_tokens=30, ignore_eos=True).text
    stop = full.strip()[3:5]
    settings = {"max_new_tokens": 30, "ignore_eos": True, "stop": json.dumps([stop, "never"])}
    status, [reply] = post(server, "generate", {"text_input": PROMPTS[1], **settings})
    expected = local.generate(PROMPTS[1], max_new_tokens=30, ignore_eos=True, stop=[stop, "never"])
    assert status == 200 and expected.finish_reason == "stop"
    assert reply["text_output"] == expected.text == full[:full.find(stop)]


def test_a_cancelled_stream_leaves_the_server_serving(server, local):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server["grpc"])
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"x"], dtype=object))
    client.start_stream(callback=lambda result, error: None)
    client.async_stream_infer("persimmon", [text], parameters={"stream": True, "max_new_tokens": 120,
                                                               "ignore_eos": True})
    client.stop_stream(cancel_requests=True)
    assert server["process"].poll() is None
    status, [reply] = post(server, "generate", {"text_input": "hi", "max_new_tokens": 3})
    assert status == 200 and reply["text_output"] == local.generate("hi", max_new_tokens=3).text
