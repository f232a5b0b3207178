"""A classifier build served by a real tritonserver (tests/tritonserver.py): a non-decoupled model
whose concurrent requests Triton's dynamic batcher runs together; answers equal the in-process
Classifier's."""

import json
import os
import time
import urllib.request

import numpy as np
import pytest
import transformers
import tritonserver
from conftest import run_together
from google.protobuf import text_format
from test_classify import LABELS, TEXTS, write_checkpoint
from test_triton import start_server, stop_server

from persimmon_export.build import build
from persimmon_export.deploy.triton import write_repository
from persimmon_export.options import BuildOptions
from persimmon_runtime import Classifier, Tokenizer

REQUESTS = 12
MAX_BATCH = 4
# long enough that requests started together on a loaded 2-core machine still meet in the queue
QUEUE_DELAY_MS = 500


@pytest.fixture(scope="module")
def classifier_build(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("triton-classify")
    checkpoint, _ = write_checkpoint(root, Tokenizer.from_dir(tiny_checkpoint),
                                     transformers.PersimmonForSequenceClassification, pad_token_id=0, id2label=LABELS)
    out = str(root / "build")
    build(checkpoint, out, BuildOptions(dtype="float32", max_batch=MAX_BATCH, max_text_tokens=64,
                                        backend="onnxruntime"))
    return out


@pytest.fixture(scope="module")
def repository(classifier_build, tmp_path_factory):
    repo = str(tmp_path_factory.mktemp("repo") / "models")
    assert write_repository(classifier_build, repo, name="sentiment", queue_delay_ms=QUEUE_DELAY_MS) == ["sentiment"]
    return repo


def test_config_is_batched_by_triton_and_not_decoupled(repository):
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(open(os.path.join(repository, "sentiment", "config.pbtxt")).read(),
                               model_config_pb2.ModelConfig())
    assert config.backend == "python" and not config.model_transaction_policy.decoupled
    assert config.max_batch_size == MAX_BATCH
    assert config.dynamic_batching.max_queue_delay_microseconds == QUEUE_DELAY_MS * 1000
    assert [o.name for o in config.output] == ["classification", "batch_size"]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert "triton_classifier" in open(os.path.join(repository, "sentiment", "1", "model.py")).read()


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    running = start_server(repository, tmp_path_factory.mktemp("server"))
    try:
        yield running
    finally:
        stop_server(running)


def infer(server, text: str) -> tuple[int, dict]:
    """(status, reply): the classification and the batch it ran in, or the error."""
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [text]}]}
    status, reply = tritonserver.post(server, "v2/models/sentiment/infer", body)
    reply = json.loads(reply)
    if status != 200:
        return status, reply
    outputs = {o["name"]: o["data"] for o in reply["outputs"]}
    return status, {"classification": json.loads(outputs["classification"][0]), "batch": outputs["batch_size"][0]}


def statistics(server, at_least: int = 0, wait_s: float = 30) -> dict:
    """The model's statistics, once they count `at_least` inferences: Triton counts a batch after
    its answers have gone out, so a client can read the count before its own requests are in it."""
    deadline = time.monotonic() + wait_s
    while True:
        with urllib.request.urlopen(f"{server['http']}/v2/models/sentiment/stats", timeout=30) as response:
            stats = json.loads(response.read())["model_stats"][0]
        if stats["inference_count"] >= at_least or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def test_concurrent_requests_are_batched_by_the_server(server, classifier_build):
    local = Classifier.load(classifier_build)
    texts = [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(REQUESTS)]
    before = statistics(server)
    answers = [None] * REQUESTS
    def classify(i):
        status, answers[i] = infer(server, texts[i])
        assert status == 200, answers[i]  # reported by run_together

    errors = run_together(classify, REQUESTS)
    assert not errors, errors
    after = statistics(server, at_least=before["inference_count"] + REQUESTS)
    requests = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert requests == REQUESTS
    assert executions < REQUESTS  # Triton ran several requests in one execution
    assert max(answer["batch"] for answer in answers) > 1  # and the model saw them together
    assert all(answer["batch"] <= MAX_BATCH for answer in answers)
    for text, answer in zip(texts, answers):
        reply = answer["classification"]
        expected = local.classify(text)
        assert reply["label"] == expected.label
        assert np.allclose([reply["scores"][label] for label in LABELS.values()],
                           [expected.scores[label] for label in LABELS.values()], atol=1e-5)


def test_a_bad_request_gets_its_own_error(server):
    status, reply = infer(server, "word " * 80)
    assert status == 400 and "tokens; this build classifies texts of 1 to 64 tokens" in reply["error"]
    status, reply = infer(server, "still serving")
    assert status == 200 and reply["classification"]["label"] in LABELS.values()


def test_a_huge_text_is_refused_before_it_is_tokenized_and_the_model_keeps_answering(server):
    """The hardening campaign's case: a 30 MB text was tokenized whole before its length was
    checked (43.6 s, 7.3 GB in the stub, other requests stalled). Its characters now bound it first."""
    status, reply = infer(server, "word " * 6_000_000)
    assert status == 400 and "text 0 has 30,000,000 characters, more than 64 tokens can hold" in reply["error"]
    status, reply = infer(server, "still serving")
    assert status == 200 and reply["classification"]["label"] in LABELS.values()
