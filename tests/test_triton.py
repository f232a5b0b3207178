"""Triton Inference Server: the generated repository, served by a real tritonserver on 127.0.0.1.

The server is the binary bundled in nvidia-pytriton's wheel, unpacked by examples/setup.sh into
.cache/tritonserver (CPU, Python backend only). Each server runs in its own process group and is
stopped with its Python-backend stubs and shared-memory regions (see stop_server).
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonserver
from conftest import error_line, make_overflow_build, run_together
from google.protobuf import text_format
from manifest_parts import engine_section

from persimmon_export.build import build
from persimmon_export.demo import make_demo_checkpoint
from persimmon_export.deploy.triton import MAX_INSTANCES, generation_config, write_repository
from persimmon_export.options import BuildOptions
from persimmon_runtime import PersimmonError
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import FileEntry, Manifest
from persimmon_runtime.sampling import SamplingParams
from persimmon_runtime.triton_model import RequestSettings, parse_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["human: What is the capital of France?\n\nadept:", "The quick brown fox", "東京", "1 2 3"]
SHM_REGIONS = tritonserver.SHM_REGIONS
# The test build's KV capacity and size: a completion filling it takes long enough (~20 s) that an
# abandoned request which ran to its end would visibly stall the next one.
CAPACITY = 4096
# the test repository's limit for non-streaming requests without timeout_s: well under what its
# CAPACITY - 96 tokens take (a 2-core AMD EPYC with AVX-512 decoded them in under 5 s)
GENERATE_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    checkpoint = make_demo_checkpoint(str(root / "ckpt"), seed=5, max_position_embeddings=CAPACITY, hidden_size=256,
                                      intermediate_size=1024, num_hidden_layers=4)
    out = str(root / "build")
    build(checkpoint, out, BuildOptions(dtype="float32", backend="onnxruntime", max_batch=2, kv_capacity=CAPACITY))
    return out


@pytest.fixture(scope="module")
def overflow_build(tmp_path_factory):
    return make_overflow_build(str(tmp_path_factory.mktemp("overflow")))


@pytest.fixture(scope="module")
def repository(build_dir, overflow_build, tmp_path_factory):
    """The repository under test, plus the overflowing model moved in beside it as `overflow`."""
    repo = str(tmp_path_factory.mktemp("repo") / "models")
    assert write_repository(build_dir, repo, instances=1, generate_timeout_s=GENERATE_TIMEOUT_S) == ["persimmon"]
    other = str(tmp_path_factory.mktemp("repo") / "overflow")
    write_repository(overflow_build, other, name="overflow")
    shutil.move(os.path.join(other, "overflow"), os.path.join(repo, "overflow"))
    return repo


def test_config_pbtxt_is_valid_for_triton(repository):
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(open(os.path.join(repository, "persimmon", "config.pbtxt")).read(),
                               model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.model_transaction_policy.decoupled
    assert [(i.name, i.optional) for i in config.input] == [("text_input", False), ("stop", True),
                                                            ("stop_words", True), ("bad_words", True)]
    assert [o.name for o in config.output] == ["text_output", "finish_reason", "prompt_tokens", "completion_tokens"]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert os.path.isfile(os.path.join(repository, "persimmon", "1", "build", "manifest.json"))


def test_a_tensorrt_build_is_served_by_the_python_model_alone(build_dir, tmp_path):
    """No tensorrt_plan model: Triton's TensorRT backend cannot bind an engine whose cache outputs
    alias its inputs (see persimmon_export.deploy.triton)."""
    import hashlib

    from tritonclient.grpc import model_config_pb2

    trt_build = tmp_path / "trt-build"
    shutil.copytree(build_dir, trt_build)
    engine = b"engine bytes: the repository writer never reads them"
    (trt_build / "engine.plan").write_bytes(engine)
    manifest = Manifest.load(str(trt_build))
    manifest.files["engine.plan"] = FileEntry(len(engine), hashlib.sha256(engine).hexdigest())
    manifest.tensorrt = engine_section()
    manifest.save(str(trt_build))
    repo = tmp_path / "repo"
    assert write_repository(str(trt_build), str(repo)) == ["persimmon"]
    assert [entry for entry in os.listdir(repo) if not entry.startswith(".")] == ["persimmon"]
    config = text_format.Parse((repo / "persimmon" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert (repo / "persimmon" / "1" / "build" / "engine.plan").read_bytes() == engine


def test_request_parameters_are_checked():
    assert parse_parameters('{"max_new_tokens": 4, "temperature": 1, "stop": "[\\"a\\", \\"b\\"]", "stream": true}') \
        == RequestSettings(True, None, {"max_new_tokens": 4, "temperature": 1.0, "stop": ["a", "b"]})
    assert parse_parameters({"timeout_s": 2, "stop": "]["}) == RequestSettings(False, 2.0, {"stop": "]["})
    with pytest.raises(PersimmonError, match="unknown parameter 'bogus'"):
        parse_parameters({"bogus": 1})
    with pytest.raises(PersimmonError, match="max_new_tokens='4' must be int"):
        parse_parameters({"max_new_tokens": "4"})


@pytest.mark.parametrize("raw,message", [
    ("{not json", "request parameters are not JSON"),
    ("[1, 2]", "must be an object of settings"),
    ({"stream": 1}, "stream=1 must be true or false"),
    ({"timeout_s": True}, "timeout_s=True"),
    ({"timeout_s": float("inf")}, "timeout_s=inf"),
    ({"timeout_s": float("nan")}, "timeout_s=nan"),
    ({"stop": "[\"a\", "}, "starts with '[' but is not a JSON list"),
    ({"seed": 1.5}, "seed=1.5 must be int"),
    ({"ignore_eos": "true"}, "ignore_eos='true' must be bool"),
    ({"y" * 1_000_000: 1}, "unknown parameter 'yyy"),
    ({"stop": "[" * 100_000 + "]" * 100_000}, "-character JSON list; stops are at most 16 strings"),  # RecursionError
    ({"stop": "[" * 3000 + "]" * 3000}, "JSON list nested too deep"),
    ("[" * 100_000 + "]" * 100_000, "request parameters are nested too deep"),
])
def test_bad_parameters_are_one_short_line(raw, message):
    with pytest.raises(PersimmonError, match=message.replace("[", "\\[")) as caught:
        parse_parameters(raw)
    assert len(str(caught.value)) < 300 and "\n" not in str(caught.value)


@pytest.mark.parametrize("text", ["abc", "-1", "nan", "inf", "", "1e999"])
def test_a_bad_generate_timeout_in_config_pbtxt_is_one_line(text):
    from persimmon_runtime.triton_model import _generate_timeout

    with pytest.raises(PersimmonError, match="generate_timeout_s=.* must be a number of seconds >= 0"):
        _generate_timeout(text)
    assert _generate_timeout("0") == 0 and _generate_timeout("2.5") == 2.5


HOSTILE_NAMES = ["", ".", "..", "../../x", "a/../../x", "/abs", "a/b", "a\\b", "..hidden", ".hidden", "-flag", "x..y",
                 'a" instance_group [ { kind: KIND_GPU count: 99 } ] name: "b', "a\nbackend: \"onnxruntime\"",
                 "a b", "a\x00b", "é", "😀", "x" * 101, "a:b", "a%2Fb", "a?b", "a#b"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_model_names_are_refused_before_anything_is_written(build_dir, tmp_path, name):
    out = tmp_path / "deep" / "er" / "repo"
    with pytest.raises(PersimmonError, match="not a usable Triton model name"):
        write_repository(build_dir, str(out), name=name)
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("name", ["persimmon", "a", "7b", "_x", "persimmon-8b.v1_0", "x" * 100])
def test_model_names_triton_accepts_are_taken(build_dir, tmp_path, name):
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "repo"
    assert write_repository(build_dir, str(repo), name=name) == [name]
    config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == name


@pytest.mark.parametrize("instances", [0, -1, MAX_INSTANCES + 1, 1_000_000, True, 1.5, "2"])
def test_instance_counts_are_bounded(build_dir, tmp_path, instances):
    with pytest.raises(PersimmonError, match=f"from 1 to {MAX_INSTANCES}"):
        write_repository(build_dir, str(tmp_path / "repo"), instances=instances)
    assert not (tmp_path / "repo").exists()


def test_no_value_can_inject_fields_into_config_pbtxt():
    """Whatever the strings hold (quotes, braces, backslashes, newlines, non-ASCII), Triton's own
    parser reads back exactly the fields we meant, with exactly those values."""
    from tritonclient.grpc import model_config_pb2

    for hostile in ['x" } } instance_group [ { kind: KIND_GPU count: 64 } ] parameters { key: "y', "\\",
                    '\\" }\nname: "evil', "line\nbreak\ttab\r", "ü東京😀", "'single' \"double\"", "#comment"]:
        text = generation_config("persimmon", "KIND_CPU", 2, hostile, 7.5)
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        [group] = config.instance_group
        assert config.name == "persimmon" and group.count == 2 and group.kind == group.KIND_CPU
        assert {key: value.string_value for key, value in config.parameters.items()} == \
            {"build_dir": "build", "backend": hostile, "generate_timeout_s": "7.5", "prefill": "auto"}


def test_python_paths_cannot_inject_code_into_model_py(build_dir, tmp_path):
    marker = tmp_path / "pwned"
    hostile = [f"']; open({str(marker)!r}, 'w'); x = ['", f'"]\nopen({str(marker)!r}, "w")\n#', "\\'", "ü\u2028x",
               "{paths}", "\udcff"]  # a path from undecodable argv bytes (surrogateescape)
    repo = tmp_path / "repo"
    write_repository(build_dir, str(repo), python_paths=hostile)
    model_py = str(repo / "persimmon" / "1" / "model.py")
    code = f"""
import json, runpy, sys
runpy.run_path({model_py!r})
print(json.dumps([p.encode("utf-8", "surrogateescape").hex() for p in sys.path]))
"""
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "runtime")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    path = [bytes.fromhex(p).decode("utf-8", "surrogateescape") for p in json.loads(result.stdout)]
    assert all(p in path for p in hostile)


@pytest.mark.parametrize("args,message", [
    (["--name", "../../x"], "not a usable Triton model name"),
    (["--name", ""], "not a usable Triton model name"),
    (["--name", 'm" } ] backend: "x'], "not a usable Triton model name"),
    (["--instances", "1000000"], "from 1 to 64"),
    (["--instances", "0"], "from 1 to 64"),
    (["--generate-timeout", "nan"], "--generate-timeout"),
    (["--generate-timeout", "-1"], "--generate-timeout"),
])
def test_triton_cli_refuses_bad_values_in_one_line(build_dir, tmp_path, capsys, args, message):
    from persimmon_export.cli import main

    out = tmp_path / "a" / "b" / "repo"
    assert main(["triton", "--build", build_dir, "--out", str(out), *args]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and error_line(stderr), stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing written anywhere under tmp_path


def test_overwrite_keeps_what_a_user_put_inside_the_repository(build_dir, tmp_path):
    """--overwrite compared only top-level names: repo/<model>/1/my_notes.txt and a new version
    directory repo/<model>/2/ vanished. Now every path we wrote is recorded, at any depth."""
    repo = tmp_path / "repo"
    write_repository(build_dir, str(repo))
    write_repository(build_dir, str(repo), overwrite=True)  # ours alone: replaced
    for extra in (repo / "persimmon" / "1" / "my_notes.txt", repo / "persimmon" / "2" / "model.py"):
        extra.parent.mkdir(exist_ok=True)
        extra.write_text("mine")
        with pytest.raises(PersimmonError, match=r"which persimmon-export did not write") as error:
            write_repository(build_dir, str(repo), overwrite=True)
        assert os.path.relpath(extra.parent if extra.parent.name == "2" else extra, repo) in str(error.value)
        assert extra.read_text() == "mine"
        shutil.rmtree(extra.parent) if extra.parent.name == "2" else extra.unlink()


def test_the_repository_takes_only_the_builds_listed_regular_files(build_dir, tmp_path):
    """A build holding `secret -> /etc/passwd` gave a repository containing the file; a link to /
    copied until the disk filled."""
    build = tmp_path / "build"
    shutil.copytree(build_dir, build)
    (build / "secret").symlink_to("/etc/passwd")
    (build / "notes.txt").write_text("not the build's")
    write_repository(str(build), str(tmp_path / "repo"))
    copied = sorted(os.listdir(tmp_path / "repo" / "persimmon" / "1" / "build"))
    assert copied == sorted(["manifest.json", *Manifest.load(str(build)).files])
    real = tmp_path / "elsewhere.model"
    shutil.move(build / "tokenizer.model", real)
    (build / "tokenizer.model").symlink_to(real)  # same bytes: the checksums hold
    with pytest.raises(PersimmonError, match=r"tokenizer.model: not a regular file"):
        write_repository(str(build), str(tmp_path / "repo2"))
    assert not (tmp_path / "repo2").exists()


def start_server(repository: str, workdir, *options: str) -> dict:
    """tritonserver (see tests/tritonserver.py) serving this checkout's runtime; skipped where there is none."""
    try:
        return tritonserver.start(repository, workdir, os.path.join(ROOT, "runtime"), *options)
    except tritonserver.Unavailable as e:
        pytest.skip(str(e))
    except RuntimeError as e:
        pytest.fail(str(e))


stop_server = tritonserver.stop


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    running = start_server(repository, tmp_path_factory.mktemp("server"))
    try:
        yield running
    finally:
        stop_server(running)


def post(server, endpoint: str, body, model: str = "persimmon", timeout: float = 120):
    """(status, [json events]) for generate (one object) or generate_stream (server-sent events).
    body: a dict, or the raw bytes to send."""
    status, text = tritonserver.post(server, f"v2/models/{model}/{endpoint}", body, timeout)
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


def test_the_models_log_shows_its_first_load_verification(server, repository):
    """A first load hashes the build (about a minute at 8B): Triton's log says so while it runs."""
    with open(server["log"].name) as f:
        log = f.read()
    build = os.path.join(repository, "persimmon", "1", "build")
    assert f"persimmon: verifying the sha256 of {build} (" in log and f"persimmon: verified {build} in " in log


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

    assert not run_together(send, 16, timeout_s=300)
    for body, (status, [reply]) in zip(bodies, results):
        assert status == 200, reply
        expected = local.generate(body["text_input"], **{k: v for k, v in body.items() if k != "text_input"}).text
        assert reply["text_output"] == expected


def _step_counters(server) -> tuple[float, float]:
    """(persimmon_steps_total, persimmon_step_requests_total) of the persimmon model, from /metrics."""
    values = dict(re.findall(r'^(persimmon_\w+)\{model="persimmon"\} (\S+)$', _metrics(server), re.MULTILINE))
    return float(values["persimmon_steps_total"]), float(values["persimmon_step_requests_total"])


def test_concurrent_streams_share_model_steps(server, local):
    """Continuous batching through the server: concurrent requests advance in the same steps (the
    model's step counters say so), and each still gets exactly its solo completion."""
    # long enough (about a second each) that requests sent together overlap on a loaded machine
    bodies = [{"text_input": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 300, "ignore_eos": True, "stream": True,
               "temperature": 0.8, "seed": i} for i in range(4)]
    steps_before, requests_before = _step_counters(server)
    results = [None] * len(bodies)

    def send(i):
        results[i] = post(server, "generate_stream", bodies[i])

    assert not run_together(send, len(bodies), timeout_s=120)
    steps, requests = (after - before for after, before in zip(_step_counters(server), (steps_before, requests_before)))
    assert requests / steps > 1.0, (steps, requests)  # more than one request per step on average
    for body, (status, events) in zip(bodies, results):
        assert status == 200, events
        settings = {k: v for k, v in body.items() if k not in ("text_input", "stream")}
        assert "".join(e["text_output"] for e in events) == local.generate(body["text_input"], **settings).text


def _metrics(server) -> str:
    with urllib.request.urlopen(server["metrics"], timeout=10) as response:
        return response.read().decode()


def _outcomes(server, model: str = "persimmon") -> dict[str, float]:
    """persimmon_requests_total by outcome, from /metrics."""
    found = re.findall(rf'^persimmon_requests_total\{{(?=[^}}]*model="{model}")[^}}]*outcome="(\w+)"[^}}]*\}} (\S+)$',
                       _metrics(server), re.MULTILINE)
    return {outcome: float(value) for outcome, value in found}


def _inference_counts(server, model: str = "persimmon") -> tuple[int, int]:
    """(success, fail) request counts from Triton's own statistics extension."""
    with urllib.request.urlopen(f"{server['http']}/v2/models/{model}/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]["inference_stats"]
    return stats["success"]["count"], stats["fail"]["count"]


def test_refused_requests_count_as_failures_in_tritons_statistics(server, local):
    """Triton's nv_inference_request_failure (and /stats) count a request the model refuses as a
    failure, and our persimmon_requests_total says how every request that reached the model ended.
    (Only the status's class is checked: Triton's generate frontend reads an error's code after
    freeing it, in GenerateRequestClass::InferResponseComplete, so 400/500/503 are not reliable.)"""
    success, fail = _inference_counts(server)
    outcomes = _outcomes(server)
    for body in ({"text_input": "hi", "max_new_tokens": -1}, {"text_input": "hi", "oops": 1},
                 {"text_input": "hi", "stop": ["x"] * 100}):
        assert post(server, "generate", body)[0] >= 400
    assert_still_serving(server, local)
    assert _inference_counts(server) == (success + 1, fail + 3)
    after = _outcomes(server)
    assert after["refused"] == outcomes["refused"] + 3 and after["success"] == outcomes["success"] + 1
    failures = re.findall(r'^nv_inference_request_failure\{(?=[^}]*model="persimmon")[^}]*\} (\S+)$',
                          _metrics(server), re.MULTILINE)
    assert sum(map(float, failures)) >= 3, failures


def test_requests_ending_together_are_counted_and_the_server_survives(server, local):
    """Many short requests at once: request threads that end in the same step count their outcome on
    the same Metric at the same moment. The Python backend's Metric.increment is not thread-safe
    (python_backend src/metric.cc: it releases the GIL, then replaces the shared memory the server
    reads), and unguarded this killed tritonserver with SIGSEGV in libtriton_python.so."""
    rounds, requests = 4, 48
    success = _outcomes(server)["success"]
    for _ in range(rounds):
        statuses = [None] * requests

        def send(i):
            statuses[i] = post(server, "generate", {"text_input": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 1})[0]

        assert not run_together(send, requests, timeout_s=300)
        assert statuses == [200] * requests
    assert_still_serving(server, local)
    assert _outcomes(server)["success"] == success + rounds * requests + 1  # + assert_still_serving's


def test_stream_true_on_generate_is_tritons_one_response_error(server, local):
    """The model cannot see which endpoint a request came through: asked to stream on `generate`, it
    sends several responses and Triton's HTTP frontend answers with its own error (see docs/triton.md)."""
    status, [reply] = post(server, "generate", {"text_input": "hi", "max_new_tokens": 4, "ignore_eos": True,
                                                "stream": True})
    assert "text_output" not in reply and "use generate stream" in reply["error"], (status, reply)
    assert_still_serving(server, local)


def assert_still_serving(server, local):
    assert server["process"].poll() is None
    status, [reply] = post(server, "generate", {"text_input": "hi", "max_new_tokens": 3})
    assert status == 200 and reply["text_output"] == local.generate("hi", max_new_tokens=3).text


_ten_thousand_stops = json.dumps([f"s{i}" for i in range(10_000)])


@pytest.mark.parametrize("body,message", [
    ({"max_new_tokens": 4}, "text_input"),
    ({"text_input": "hi", "max_new_tokens": -3}, "max_new_tokens=-3"),
    ({"text_input": "hi", "max_new_tokens": 10**15}, "kv_capacity"),
    ({"text_input": "hi", "max_new_tokens": "4"}, "max_new_tokens='4' must be int"),
    ({"text_input": "hi", "max_new_tokens": True}, "max_new_tokens=True must be int"),
    ({"text_input": "hi", "temperature": "hot"}, "temperature='hot' must be float"),
    ({"text_input": "hi", "top_k": -1}, "top_k=-1"),
    ({"text_input": "hi", "top_p": 7}, "top_p"),
    ({"text_input": "hi", "seed": -1}, "seed"),
    ({"text_input": "hi", "stream": "yes"}, "stream='yes' must be true or false"),
    ({"text_input": "hi", "timeout_s": 0}, "timeout_s=0 must be a number of seconds > 0"),
    ({"text_input": "hi", "timeout_s": -5}, "timeout_s=-5"),
    ({"text_input": "hi", "timeout_s": "soon"}, "timeout_s='soon'"),
    ({"text_input": "hi", "frequency_penalty": 0.5}, "unknown parameter 'frequency_penalty'"),
    ({"text_input": "hi", "x" * 10_000: 1}, "unknown parameter 'xxxx"),
    ({"text_input": "hi", "stop": _ten_thousand_stops}, "-character JSON list; stops are at most 16"),
    ({"text_input": "hi", "stop": "z" * 100_000}, "100000 characters"),
    # stop is an optional input (so that it takes a real list): Triton itself refuses a number for it
    ({"text_input": "hi", "stop": 123}, "Unable to parse JSON bytes array"),
    ({"text_input": "hi", "stop": ""}, "stop="),
    ({"text_input": "x " * 20_000}, "kv_capacity"),
    ({"text_input": "hi", "parameters": {"max_new_tokens": -1}}, "max_new_tokens=-1"),
])
def test_bad_requests_get_an_error_and_the_server_stays_up(server, local, body, message):
    status, [reply] = post(server, "generate", body)
    assert status >= 400 and message in reply["error"] and "internal error" not in reply["error"], reply
    assert len(reply["error"]) < 500 and "\n" not in reply["error"]  # one line, even for huge inputs
    assert_still_serving(server, local)


@pytest.mark.parametrize("body", [
    b'{"text_input": "\xff\xfe bad bytes"}',
    b'{"text_input": "hi", "max_new_tokens": }',
    b'{"text_input": "hi", "temperature": {"nested": 1}}',
    b'{"text_input": "hi", "max_new_tokens": 1e400}',
    b'{"text_input": ["a", "b"]}',
    b"[]",
    b"",
])
def test_malformed_http_bodies_get_an_error_and_the_server_stays_up(server, local, body):
    status, [reply] = post(server, "generate", body)
    assert status >= 400 and reply["error"], reply
    assert_still_serving(server, local)


def test_invalid_utf8_and_wrong_shapes_over_grpc_get_an_error(server, local):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server["grpc"])
    for values, message in [([b"\xff\xfe\xfd"], "text_input is not UTF-8 (byte 0xff at offset 0)"),
                            ([b"ok \xc3"], "byte 0xc3 at offset 3"),
                            ([b"\xed\xa0\x80"], "not UTF-8"),  # an encoded lone surrogate
                            ([b"a", b"b"], "text_input")]:
        text = grpcclient.InferInput("text_input", [len(values)], "BYTES")
        text.set_data_from_numpy(np.array(values, dtype=object))
        errors = []
        client.start_stream(callback=lambda result, error: errors.append(error))
        client.async_stream_infer("persimmon", [text], parameters={"max_new_tokens": 3})
        deadline = time.monotonic() + 30
        while not errors and time.monotonic() < deadline:
            time.sleep(0.05)
        client.stop_stream()
        assert isinstance(errors[0], InferenceServerException) and message in str(errors[0]), errors
    assert_still_serving(server, local)


def test_non_finite_logits_are_an_error_response(server, local):
    """A model whose logits overflow: the generator's PersimmonError, not token 0 forever."""
    for endpoint in ("generate", "generate_stream"):
        failed = _outcomes(server, "overflow")["failed"]
        status, events = post(server, endpoint, {"text_input": "hi", "max_new_tokens": 4, "ignore_eos": True,
                                                 "stream": endpoint == "generate_stream"}, model="overflow")
        assert status >= 400 and _outcomes(server, "overflow")["failed"] == failed + 1
        errors = [e["error"] for e in events if "error" in e]
        assert errors and "NaN/inf logits" in errors[-1] and "internal error" not in errors[-1], events
        assert not [e for e in events if e.get("text_output")]  # no garbage text before the error
    assert_still_serving(server, local)


def test_an_abandoned_generate_stops_at_its_deadline(server, local):
    """Triton gives a non-streaming `generate` no sign that its client left: the request's
    timeout_s is what stops it. Without it, this request would hold the model for its whole
    4000 tokens (about 20 s) and stall the next request as long."""
    long_request = {"text_input": "x", "max_new_tokens": CAPACITY - 96, "ignore_eos": True, "timeout_s": 0.5}
    with pytest.raises(TimeoutError):  # the client gives up after 0.2 s and closes its connection
        post(server, "generate", long_request, timeout=0.2)
    started = time.monotonic()
    assert_still_serving(server, local)
    assert time.monotonic() - started < 4.0

    started = time.monotonic()  # the same request, waited for: its answer says why it stopped
    status, [reply] = post(server, "generate", long_request)
    assert status >= 400 and "stopped after" in reply["error"] and "timeout_s=0.5" in reply["error"], reply
    assert time.monotonic() - started < 4.0


def test_the_models_generate_timeout_bounds_requests_without_their_own(server, local):
    started = time.monotonic()
    status, [reply] = post(server, "generate", {"text_input": "x", "max_new_tokens": CAPACITY - 96,
                                                "ignore_eos": True})
    assert status >= 400 and f"generate_timeout_s={GENERATE_TIMEOUT_S:g}" in reply["error"], reply
    assert GENERATE_TIMEOUT_S <= time.monotonic() - started < GENERATE_TIMEOUT_S + 4
    assert_still_serving(server, local)


def test_a_closed_generate_stream_stops_generating(server, local):
    body = json.dumps({"text_input": "x", "max_new_tokens": CAPACITY - 96, "ignore_eos": True,
                       "stream": True}).encode()
    request = urllib.request.Request(f"{server['http']}/v2/models/persimmon/generate_stream", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.readline().startswith(b"data: ")
    started = time.monotonic()
    assert_still_serving(server, local)
    assert time.monotonic() - started < 4.0


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


def test_a_cancelled_grpc_stream_stops_generating(server, local):
    """Left running, this stream would generate its 4000 tokens (about 20 s). With continuous
    batching a next request would share its steps and be served at once anyway, so the proof is
    the model's step counter: once the cancelled request's row is freed, with nothing else in
    flight, no more steps run."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server["grpc"])
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"x"], dtype=object))
    first_piece = threading.Event()
    client.start_stream(callback=lambda result, error: first_piece.set())
    client.async_stream_infer("persimmon", [text], parameters={"stream": True, "max_new_tokens": CAPACITY - 96,
                                                               "ignore_eos": True})
    assert first_piece.wait(timeout=60)  # generation is under way
    client.stop_stream(cancel_requests=True)
    time.sleep(1.0)  # the row is freed at the next piece or within 50 ms (should_stop's poll)
    steps_after_cancel, _ = _step_counters(server)
    time.sleep(1.0)  # a running decode of this model makes hundreds of steps a second
    assert _step_counters(server)[0] == steps_after_cancel, "steps still run after the only request was cancelled"
    started = time.monotonic()
    assert_still_serving(server, local)
    assert time.monotonic() - started < 4.0
    assert server["process"].poll() is None


def _replace_with_flipped_bytes(path: str, count: int = 64) -> None:
    """Replace the file with a same-size copy whose `count` middle bytes are inverted. A new file,
    not a write in place: the repository hard-links the build's files, which must stay intact."""
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def test_a_corrupt_build_is_not_loaded_and_other_models_keep_serving(build_dir, overflow_build, local, tmp_path):
    """The repository's copy of a build with flipped bytes in model.onnx.data (same size, so only
    the checksum can tell): Triton must not serve it, the load error must name the file, and the
    healthy model beside it must serve as usual."""
    repo = tmp_path / "repo"
    write_repository(build_dir, str(repo))
    other = tmp_path / "other"
    write_repository(overflow_build, str(other), name="corrupt")
    shutil.move(str(other / "corrupt"), str(repo / "corrupt"))
    data = repo / "corrupt" / "1" / "build" / "model.onnx.data"
    original = os.path.join(overflow_build, "model.onnx.data")
    _replace_with_flipped_bytes(str(data))
    assert data.stat().st_size == os.path.getsize(original) and not os.path.samefile(data, original)
    # By default a model that fails to load stops tritonserver; a shared server keeps its other models.
    running = start_server(str(repo), tmp_path, "--exit-on-error", "false", "--strict-readiness", "false")
    try:
        index = {m["name"]: m for m in _repository_index(running)}
        assert index["persimmon"]["state"] == "READY", index
        assert index["corrupt"]["state"] == "UNAVAILABLE", index
        assert "model.onnx.data: sha256" in index["corrupt"]["reason"], index
        assert "differs from the manifest" in index["corrupt"]["reason"], index
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{running['http']}/v2/models/corrupt/ready", timeout=10)
        status, [reply] = post(running, "generate", {"text_input": "hi", "max_new_tokens": 3}, model="corrupt")
        assert status >= 400 and "corrupt" in reply["error"], reply
        assert_still_serving(running, local)
    finally:
        stop_server(running)
    Manifest.load(overflow_build)  # the build the repository linked to is intact: other tests serve it


def _repository_index(server) -> list[dict]:
    request = urllib.request.Request(f"{server['http']}/v2/repository/index", data=b"{}",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_server_leaves_no_stub_process_or_shared_memory(repository, tmp_path, sig):
    """The server alone gets the signal (a user's `kill`, the OOM killer) while it streams: it exits
    (after --exit-timeout-secs for SIGTERM), and its stub, stuck talking to it, stays behind with
    the shared memory. stop_server must end the stub and remove the region."""
    running = start_server(repository, tmp_path, "--exit-timeout-secs", "1")
    pgid = running["process"].pid
    regions = set(glob.glob(SHM_REGIONS)) - running["regions_before"]
    assert regions  # the Python backend's region exists while the server runs
    body = json.dumps({"text_input": "x", "max_new_tokens": CAPACITY - 96, "ignore_eos": True, "stream": True})
    request = urllib.request.Request(f"{running['http']}/v2/models/persimmon/generate_stream", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as stream:
        assert stream.readline().startswith(b"data: ")  # a generation is under way
        os.kill(pgid, sig)
        running["process"].wait(timeout=60)
    # What the server's death leaves varies: usually the stub and its region, but a stub that notices
    # in time removes some of it itself. Whatever is left, stop_server must clear it.
    stop_server(running)
    assert tritonserver.group_members(pgid) == []
    assert not [r for r in regions if os.path.exists(r)]


def test_overwrite_takes_the_bytecode_cache_tritons_python_backend_leaves(build_dir, tmp_path):
    """Triton imports <model>/1/model.py, and Python writes <model>/1/__pycache__/ beside it: that is
    no one's data, and --overwrite must not refuse the repository for it."""
    repo = tmp_path / "repo"
    write_repository(build_dir, str(repo))
    cache = repo / "persimmon" / "1" / "__pycache__"
    cache.mkdir()
    (cache / "model.cpython-311.pyc").write_bytes(b"\x00")
    write_repository(build_dir, str(repo), overwrite=True)
    assert not cache.exists() and (repo / "persimmon" / "1" / "model.py").is_file()


def test_tensorrt_llms_documented_generate_body_works_as_written(server, local):
    """TensorRT-LLM's Triton docs: curl -X POST localhost:8000/v2/models/ensemble/generate -d
    '{"text_input": "What is machine learning?", "max_tokens": 20, "bad_words": "", "stop_words": ""}'"""
    body = {"text_input": "What is machine learning?", "max_tokens": 20, "bad_words": "", "stop_words": ""}
    status, [reply] = post(server, "generate", body)
    expected = local.generate("What is machine learning?", max_new_tokens=20)
    assert status == 200, reply
    assert reply["text_output"] == expected.text
    assert (reply["finish_reason"], reply["prompt_tokens"], reply["completion_tokens"]) == (
        "length" if expected.finish_reason == "length" else "stop", expected.prompt_tokens, len(expected.token_ids))
    seeded = {"text_input": PROMPTS[2], "max_tokens": 12, "temperature": 0.9, "top_k": 40, "top_p": 0.9,
              "random_seed": 5, "end_id": local.manifest.eos_token_ids[0], "pad_id": 0}
    status, [reply] = post(server, "generate", seeded)
    assert status == 200 and reply["text_output"] == local.generate(
        PROMPTS[2], max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=5).text


def test_stop_takes_a_real_json_list_and_streams_end_with_the_finish_reason(server, local):
    full = local.generate(PROMPTS[1], max_new_tokens=30, ignore_eos=True).text
    stop = full.strip()[3:5]
    expected = local.generate(PROMPTS[1], max_new_tokens=30, ignore_eos=True, stop=[stop, "never"])
    for key in ("stop", "stop_words"):
        status, [reply] = post(server, "generate", {"text_input": PROMPTS[1], "max_new_tokens": 30,
                                                    "ignore_eos": True, key: [stop, "never"]})
        assert status == 200 and (reply["text_output"], reply["finish_reason"]) == (expected.text, "stop"), reply
    status, events = post(server, "generate_stream", {"text_input": PROMPTS[1], "max_tokens": 30, "ignore_eos": True,
                                                      "stream": True, "stop_words": [stop]})
    assert status == 200 and "".join(e["text_output"] for e in events) == expected.text
    assert events[-1]["finish_reason"] == "stop" and events[-1]["completion_tokens"] == len(expected.token_ids)
    assert all("finish_reason" not in e for e in events[:-1])


def test_chat_requests_are_rendered_with_the_builds_template(server, local):
    status, [reply] = post(server, "generate", {"text_input": "Hi there", "chat": True, "max_tokens": 8})
    assert status == 200 and reply["text_output"] == local.chat("Hi there", max_new_tokens=8).text


@pytest.mark.parametrize("body,message", [
    ({"text_input": "hi", "bad_words": ["darn"]}, "bad_words is not supported"),
    ({"text_input": "hi", "end_id": 123456}, "end_id=123456 is not this model's end token"),
    ({"text_input": "hi", "max_tokens": 4, "max_new_tokens": 4}, "sets max_new_tokens a second time"),
    ({"text_input": "hi", "chat": "yes"}, "chat='yes' must be true or false"),
    ({"text_input": "hi", "stop": ["x"] * 100}, "stop has 100 strings"),
    ({"text_input": "hi", "stop": ["a"], "parameters": {"stop": "b"}}, "input 'stop' already exists in request"),
])
def test_bad_tensorrt_llm_style_requests_get_an_error(server, local, body, message):
    status, [reply] = post(server, "generate", body)
    assert status >= 400 and message in reply["error"], reply
    assert_still_serving(server, local)


def test_the_example_clients_command_line(server, local):
    script = os.path.join(ROOT, "examples", "triton_client.py")
    url = server["http"].removeprefix("http://")
    done = subprocess.run([sys.executable, script, "--url", url, "--chat", "Hi there", "--max-new-tokens", "12",
                           "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "--stop", "zzz"],
                          capture_output=True, text=True, timeout=120)
    expected = local.chat("Hi there", max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3, stop=["zzz"]).text
    assert done.returncode == 0 and done.stdout == expected + "\n", done.stderr
    bad = subprocess.run([sys.executable, script, "--url", url, "hi", "--temperature", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: HTTP 400: temperature=-1")


def test_list_inputs_and_parameters_cannot_both_set_a_field():
    """Over gRPC an input tensor and a request parameter of one name could both arrive."""
    with pytest.raises(PersimmonError, match="stop is given both as an input and as a parameter"):
        parse_parameters('{"stop": "a"}', {"stop": ["b"]})
    settings = parse_parameters('{"max_tokens": 5, "random_seed": 2}', {"stop_words": ["", "end"]})
    assert settings.sampling == {"max_new_tokens": 5, "seed": 2, "stop": ["end"]}
    # list inputs are taken as given: a stop that looks like JSON stays a stop...
    for stops in (["[INST]"], ["[1]"], ["[/INST]", "x"]):
        assert parse_parameters("{}", {"stop": stops}).sampling["stop"] == stops
    # ...except one string holding a JSON list of strings, the way lists were sent before
    assert parse_parameters("{}", {"stop": ['["a", "b"]']}).sampling["stop"] == ["a", "b"]
    assert parse_parameters("{}", {"bad_words": ["", ""]}).sampling == {}
    # a request parameter (a scalar: gRPC) holding what is not a JSON list of strings is refused, by
    # parse_parameters (not JSON) or by the sampling settings (not strings)
    for raw, message in (('{"stop": "[unclosed"}', "not a JSON list"), ('{"stop": "[1, 2]"}', "stop=")):
        with pytest.raises(PersimmonError, match=re.escape(message)):
            SamplingParams(**parse_parameters(raw).sampling)
