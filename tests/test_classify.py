"""Classifier builds (issue 16) against transformers' classification models, on checkpoints
transformers wrote (save_pretrained): the graph with left and right padding, the runtime's
batching and scores (softmax, multi-label sigmoid), token offsets, fp16, a TensorRT-RTX engine,
the manifest, parity and the command line."""

import os
import re
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from conftest import run_without_torch, transformers_checkpoint

from persimmon_export.build import build
from persimmon_export.cli import main as export_main
from persimmon_export.engine.tensorrt import TENSORRT_RTX, parse_onnx
from persimmon_export.options import BuildOptions
from persimmon_export.validate.parity import check_parity
from persimmon_runtime import Classifier, PersimmonError, Tokenizer
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import Manifest, ManifestError

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TEXTS = ["I loved it.", "Hello world, this is a test of a longer sentence that pads the others", "東京 🎉",
         "no", "The quick brown fox jumps over the lazy dog."]
RTX_VERSION, RTX_MISSING = TENSORRT_RTX.installed()


def write_checkpoint(root, tokenizer: Tokenizer, hf_class, seed=0, **fields):
    """A tiny classification checkpoint written by transformers (save_pretrained) with our tokenizer
    files; weights drawn larger than transformers' init so that attention and the head matter."""
    def larger(model):
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 1.0 if name.startswith("score") else 0.2)

    out = str(root / "checkpoint")
    return out, transformers_checkpoint(out, tokenizer, hf_class, seed, init=larger, **fields)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_dir(tiny_checkpoint)


def make(tmp_path_factory, tokenizer, name, hf_class, dtype="float32", backend="onnxruntime", **fields):
    root = tmp_path_factory.mktemp(name)
    checkpoint, model = write_checkpoint(root, tokenizer, hf_class, **fields)
    out = str(root / "build")
    build(checkpoint, out, BuildOptions(dtype=dtype, max_batch=2, max_text_tokens=64,
                                        backend=backend))  # task from architectures
    return checkpoint, model, out


@pytest.fixture(scope="module")
def sequence(tmp_path_factory, tokenizer):
    return make(tmp_path_factory, tokenizer, "sequence", transformers.PersimmonForSequenceClassification,
                pad_token_id=0, id2label=LABELS)


@pytest.fixture(scope="module")
def token(tmp_path_factory, tokenizer):
    return make(tmp_path_factory, tokenizer, "token", transformers.PersimmonForTokenClassification,
                num_labels=5, qk_layernorm=False)


def padded_batch(vocab, lengths, left):
    """Random ids (never the pad id 0) padded with 0 on the left or the right, and their mask."""
    generator = torch.Generator().manual_seed(sum(lengths))
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        real = slice(width - length, width) if left else slice(0, length)
        mask[row, real] = 1
    ids[mask == 0] = 0
    return ids, mask


def run_graph(build_dir, ids, mask):
    session = ort.InferenceSession(os.path.join(build_dir, "model.onnx"))
    return session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_sequence_graph_pools_like_transformers(sequence, left):
    _, model, out = sequence
    ids, mask = padded_batch(model.config.vocab_size, [11, 4, 7, 1], left)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits.numpy()
    got = run_graph(out, ids, mask)
    assert got.shape == (4, 3) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    assert np.abs(expected).max() > 1.0  # logits large enough that a wrong token would show


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_token_graph_matches_transformers_on_real_tokens(token, left):
    _, model, out = token
    ids, mask = padded_batch(model.config.vocab_size, [9, 3], left)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits.numpy()
    got = run_graph(out, ids, mask)
    assert got.shape == (2, 9, 5)
    real = mask.numpy().astype(bool)
    assert np.abs(got - expected)[real].max() <= 1e-4 * max(1.0, np.abs(expected).max())


def hf_logits(model, tokenizer, text):
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(text)])).logits[0].numpy()


def test_classifier_batches_and_scores_as_transformers(sequence, tokenizer):
    _, model, out = sequence
    classifier = Classifier.load(out)
    results = classifier.classify(TEXTS)  # 5 texts in batches of max_batch 2, right-padded
    for text, result in zip(TEXTS, results):
        logits = hf_logits(model, tokenizer, text)  # each text alone, no padding
        expected = torch.softmax(torch.tensor(logits), -1).numpy()
        got = np.array([result.scores[LABELS[i]] for i in range(3)])
        assert np.abs(got - expected).max() <= 1e-5
        assert result.label == LABELS[int(logits.argmax())] and result.labels == [result.label]
    single = classifier.classify(TEXTS[2])
    assert single == results[2]


def test_multi_label_scores_are_sigmoids(tmp_path_factory, tokenizer):
    _, model, out = make(tmp_path_factory, tokenizer, "multi", transformers.PersimmonForSequenceClassification,
                         pad_token_id=0, num_labels=4, problem_type="multi_label_classification")
    assert Manifest.load(out).classifier.problem_type == "multi_label_classification"
    for text, result in zip(TEXTS, Classifier.load(out).classify(TEXTS)):
        expected = torch.sigmoid(torch.tensor(hf_logits(model, tokenizer, text))).numpy()
        got = np.array([result.scores[f"LABEL_{i}"] for i in range(4)])
        assert np.abs(got - expected).max() <= 1e-5
        chosen = [f"LABEL_{i}" for i in np.argsort(-expected) if expected[i] >= 0.5]
        assert result.labels == chosen
    assert any(len(r.labels) > 1 for r in Classifier.load(out).classify(TEXTS))  # really multi-label here


def test_without_a_pad_token_each_text_runs_alone(tmp_path_factory, tokenizer):
    # transformers refuses batches > 1 without pad_token_id; the build pools at the last token
    _, model, out = make(tmp_path_factory, tokenizer, "nopad", transformers.PersimmonForSequenceClassification)
    with pytest.raises(ValueError, match="padding token"):
        model(torch.ones(2, 3, dtype=torch.long))
    classifier = Classifier.load(out)
    assert classifier.max_batch == 1
    for text, result in zip(TEXTS, classifier.classify(TEXTS)):
        expected = torch.softmax(torch.tensor(hf_logits(model, tokenizer, text)), -1).numpy()
        assert abs(result.score - expected.max()) <= 1e-5


def test_token_labels_carry_character_offsets(token, tokenizer):
    _, model, out = token
    results = Classifier.load(out).classify(TEXTS)
    for text, tokens in zip(TEXTS, results):
        logits = hf_logits(model, tokenizer, text)[1:]  # BOS stands for no text and is left out
        assert len(tokens) == len(logits)
        assert "".join(t.text for t in tokens) == text  # the spans tile the text
        assert all(text[t.start:t.end] == t.text for t in tokens)
        assert [t.label for t in tokens] == [f"LABEL_{i}" for i in logits.argmax(-1)]
        expected = torch.softmax(torch.tensor(logits), -1).numpy().max(-1)
        assert np.abs(np.array([t.score for t in tokens]) - expected).max() <= 1e-5


def test_encode_with_offsets_gives_the_ids_of_encode(sp_model, sp_model_user_defined):
    for model_file in (sp_model, sp_model_user_defined):
        tokenizer = Tokenizer(model_file)
        for text in TEXTS + ["", "  a  ", "|ENDOFTEXT| typed"]:
            ids, spans = tokenizer.encode_with_offsets(text)
            assert ids == tokenizer.encode(text) and len(spans) == len(ids)
            assert spans[0] == (0, 0) and all(0 <= a <= b <= len(text) for a, b in spans)
            assert "".join(text[a:b] for a, b in dict.fromkeys(spans)) == text


def test_float16_build_is_within_the_fp16_bound(tmp_path_factory, tokenizer):
    _, model, out = make(tmp_path_factory, tokenizer, "fp16", transformers.PersimmonForSequenceClassification,
                         dtype="float16", pad_token_id=0, id2label=LABELS)
    classifier = Classifier.load(out)
    got = np.stack(classifier.logits([tokenizer.encode(t) for t in TEXTS]))
    expected = np.stack([hf_logits(model, tokenizer, t) for t in TEXTS])
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()


@pytest.mark.parametrize("token_ids, message", [
    ([[]], "text 0 is 0 tokens"),
    ([[5], [10**6]], "text 1: input_ids[0, 0] = 1000000 is not a token id"),
    ([[5, -1]], "text 0: input_ids[0, 1] = -1 is not a token id"),
    ([[1.5]], "text 0: token ids must be a list of int"),
    ([7], "text 0: token ids must be a list of int, got int"),
    ("5 6", "must be a list of token id lists"),
    ([[5] * 10_000], "text 0 is 10000 tokens"),
])
def test_classifier_logits_refuses_bad_token_ids_in_one_line(sequence, token_ids, message):
    """Classifier.logits takes ids from callers (parity, the Triton model, users): bad ones are one
    PersimmonError line, not an onnxruntime error from the graph's Gather or ArgMax."""
    classifier = Classifier.load(sequence[2])
    assert classifier.logits([]) == []  # the Triton model runs an empty batch when every request was bad
    with pytest.raises(PersimmonError, match=re.escape(message)) as caught:
        classifier.logits(token_ids)
    assert "\n" not in str(caught.value)


def test_parity_checks_classifier_logits(sequence, token):
    for checkpoint, _, out in (sequence, token):
        (result,) = check_parity(checkpoint, out)
        assert result.passed and result.max_abs_diff <= 1e-4, result.line()


def test_build_task_flag_and_manifest(sequence, tmp_path):
    checkpoint, _, _ = sequence
    out = str(tmp_path / "cli")
    assert export_main(["build", "--checkpoint", checkpoint, "--out", out, "--task", "sequence-classification",
                        "--dtype", "float32", "--max-batch", "3", "--max-text-tokens", "32", "-q"]) == 0
    manifest = Manifest.load(out)
    assert (manifest.task, manifest.max_batch, manifest.kv_capacity) == ("sequence-classification", 3, 32)
    assert manifest.classifier.labels == list(LABELS.values()) and manifest.classifier.pad_token_id == 0
    assert [s.name for s in manifest.onnx.inputs] == ["input_ids", "attention_mask"]
    assert manifest.onnx.cache_aliases == {} and manifest.onnx.cache_layout == "none"
    with pytest.raises(PersimmonError, match="is a sequence-classification build, not a causal LM"):
        Generator.load(out)
    with pytest.raises(PersimmonError, match=r"text 1 is \d+ tokens; .* 1 to 32 tokens"):
        Classifier.load(out).classify(["short", "word " * 40])


def test_a_causal_lm_build_is_not_a_classifier(tiny_build):
    assert Manifest.load(tiny_build).task == "causal-lm"
    with pytest.raises(PersimmonError, match="is a causal-lm build, not a classifier"):
        Classifier.load(tiny_build)


@pytest.mark.parametrize("field,value,message", [
    ("classifier", None, "needs the classifier section"),
    ("task", "summarization", "field task must be"),
    ("classifier.labels", ["a", "b"], r"logits shape \['batch', 3\] does not fit"),
    ("classifier.problem_type", "ranking", "field classifier.problem_type must be"),
    ("classifier.pad_token_id", 10**6, "pad_token_id 1000000 is >= vocab_size"),
])
def test_bad_classifier_manifests_are_refused(sequence, field, value, message):
    import json

    from persimmon_runtime.manifest import validate

    with open(os.path.join(sequence[2], "manifest.json")) as f:
        raw = json.load(f)
    section, _, key = field.partition(".")
    if key:
        raw[section][key] = value
    else:
        raw[section] = value
    with pytest.raises(ManifestError, match=message):
        validate("manifest.json", raw)


def test_docs_manifest_md_describes_the_classifier_fields():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "manifest.md"), encoding="utf-8").read()
    for field in ("task", "classifier", "classifier.labels", "classifier.problem_type", "classifier.pad_token_id"):
        assert f"| `{field}` |" in doc, field


def test_runtime_classifies_without_torch(sequence):
    result = run_without_torch(f"""
        from persimmon_runtime import Classifier
        print(Classifier.load({sequence[2]!r}).classify(["a b c", "d"])[0].label)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in LABELS.values()


@pytest.mark.skipif(RTX_VERSION is None, reason=f"TensorRT-RTX is not installed: {RTX_MISSING}")
def test_tensorrt_rtx_engine_of_a_classifier(tmp_path_factory, tokenizer):
    import tensorrt_rtx as trt

    _, _, out = make(tmp_path_factory, tokenizer, "rtx", transformers.PersimmonForSequenceClassification,
                     dtype="float16", backend="tensorrt-rtx", pad_token_id=0, id2label=LABELS)
    manifest = Manifest.load(out)
    section = manifest.tensorrt
    assert (section.flavor, section.cache_update) == ("tensorrt-rtx", "none")
    assert [p.role for p in section.profiles] == ["classify"]
    assert section.profiles[0].shapes["input_ids"] == [[1, 1], [2, 64], [2, 64]]
    assert os.path.getsize(os.path.join(out, section.engine_file)) > 0
    network = parse_onnx(TENSORRT_RTX, os.path.join(out, section.onnx_file)).network
    assert network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    inputs = [(network.get_input(i).name, tuple(network.get_input(i).shape)) for i in range(network.num_inputs)]
    assert inputs == [("input_ids", (-1, -1)), ("attention_mask", (-1, -1))]
    output = network.get_output(0)
    assert (network.num_outputs, output.name, output.dtype, tuple(output.shape)) == (1, "logits", trt.float32, (-1, 3))


def test_duplicate_labels_are_refused_at_build_and_at_load(sequence, tmp_path, tokenizer):
    """Two indices with one name: the scores of both would land under one label."""
    import json

    checkpoint, _ = write_checkpoint(tmp_path, tokenizer, transformers.PersimmonForSequenceClassification,
                                     pad_token_id=0, id2label={0: "same", 1: "other", 2: "same"})
    with pytest.raises(PersimmonError, match=r"id2label names 'same' for more than one index"):
        build(checkpoint, str(tmp_path / "b"), BuildOptions(dtype="float32", max_batch=2, max_text_tokens=64,
                                                            backend="onnxruntime"))
    copy = tmp_path / "copy"
    shutil.copytree(sequence[2], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["classifier"]["labels"][2] = manifest["classifier"]["labels"][0]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"classifier.labels names '.*' twice"):
        Manifest.load(str(copy))
