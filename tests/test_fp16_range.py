"""float16 builds choose each layer's relu^2 scale from its weights (issue 13): a large
dense_4h_to_h weight lowers its layer's scale instead of becoming inf, and a weight float16
cannot hold at all is refused in one line."""

import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from persimmon_export.build import build
from persimmon_export.graph.export import ExportError, relu2_scale
from persimmon_export.options import BuildOptions
from persimmon_runtime.backends.step import step_feeds
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import Manifest

W2 = "model.layers.0.mlp.dense_4h_to_h.weight"
W1 = "model.layers.0.mlp.dense_h_to_4h"
PROMPTS = ["human: What is the capital of France?\n\nadept:", "The quick brown", "🎉"]


def with_w2_entry(checkpoint: str, out: str, value: float) -> str:
    """A copy of `checkpoint` whose layer-0 W2[5, 7] is `value`. Hidden unit 7's inputs are divided
    by 20 so that its output, value * relu(x)^2, is of the size of the rest of the residual stream:
    at full size it would swamp it and every prompt would answer the same token."""
    shutil.copytree(checkpoint, out)
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    tensors[W2][5, 7] = value
    tensors[f"{W1}.weight"][7] /= 20
    tensors[f"{W1}.bias"][7] /= 20
    save_file(tensors, path, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def large_w2(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a W2 entry of 300 (x256 = 76800, past float16's 65504) and its
    float16 and float32 builds."""
    root = tmp_path_factory.mktemp("large_w2")
    checkpoint = with_w2_entry(tiny_checkpoint, str(root / "checkpoint"), 300.0)
    builds = {dtype: str(root / dtype) for dtype in ("float16", "float32")}
    for dtype, out in builds.items():
        build(checkpoint, out, BuildOptions(dtype=dtype, max_batch=len(PROMPTS), kv_capacity=96, backend="onnxruntime"))
    return checkpoint, builds


def prefill_logits(directory: str, ids: list[int]) -> np.ndarray:
    """The last token's logits of one prefill step, run by a plain onnxruntime session."""
    manifest = Manifest.load(directory)
    session = ort.InferenceSession(os.path.join(directory, "model.onnx"), providers=["CPUExecutionProvider"])
    heads, capacity, head_dim = manifest.cache_shape
    slots = len(ids) if manifest.onnx.cache_layout == "whole" else capacity  # `whole`: cache length = mask width
    cache = np.zeros((1, heads, slots, head_dim), np.float16 if manifest.dtype == "float16" else np.float32)
    feeds = {**step_feeds(manifest.step_inputs, np.array([ids], np.int64), np.zeros(1, np.int64),
                          np.array([len(ids)], np.int64), np.ones((1, len(ids)), np.int64)),
             **{name: cache for name in manifest.cache_inputs}}
    return session.run(["logits"], feeds)[0].reshape(-1)


def test_a_w2_entry_of_300_builds_in_float16_with_the_float32_builds_greedy_tokens(large_w2):
    _, builds = large_w2
    fp16, fp32 = (Generator.load(builds[d]).generate(PROMPTS, max_new_tokens=24, ignore_eos=True)
                  for d in ("float16", "float32"))
    assert [c.token_ids for c in fp16] == [c.token_ids for c in fp32]
    assert len({t for c in fp32 for t in c.token_ids}) > 3  # the entry does not swamp the model


def test_its_float16_logits_are_finite_and_within_the_fp16_bound_of_transformers(large_w2):
    checkpoint, builds = large_w2
    ids = Generator.load(builds["float32"]).tokenizer.encode(PROMPTS[0])
    hf = transformers.PersimmonForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, -1].numpy()
    fp16, fp32 = (prefill_logits(builds[d], ids) for d in ("float16", "float32"))
    assert np.isfinite(fp16).all()
    assert np.abs(fp32 - expected).max() <= 1e-4  # the build reads the changed weight as transformers does
    assert np.abs(fp16 - expected).max() <= 0.02 * np.abs(expected).max()  # parity's fp16 bound


def test_the_scale_is_chosen_per_layer_and_folded_exactly(large_w2):
    checkpoint, builds = large_w2
    original = load_file(os.path.join(checkpoint, "model.safetensors"))
    model = onnx.load(os.path.join(builds["float16"], "model.onnx"))  # external data loaded too
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    # layer 0: 300 * 16^2 would overflow, 300 * 8^2 = 19200 is within half of 65504; layer 1 keeps 16
    for layer, s in ((0, 8.0), (1, 16.0)):
        mlp = f"model.layers.{layer}.mlp"
        weight_2, weight_1 = original[f"{mlp}.dense_4h_to_h.weight"], original[f"{mlp}.dense_h_to_4h.weight"]
        assert np.array_equal(stored[f"{mlp}.dense_4h_to_h.weight"], (weight_2.T * s * s).half().numpy())
        assert np.array_equal(stored[f"{mlp}.dense_h_to_4h.weight"], (weight_1.T / s).half().numpy())
        assert np.array_equal(stored[f"{mlp}.dense_h_to_4h.bias"], (original[f"{mlp}.dense_h_to_4h.bias"] / s)
                              .half().numpy())
    assert stored[W2].max() == 19200


@pytest.mark.parametrize("largest, dtype, scale", [
    (1.0, "float16", 16.0), (127.9, "float16", 16.0), (128.0, "float16", 8.0), (300.0, "float16", 8.0),
    (32752.0, "float16", 1.0), (65504.0, "float16", 1.0), (1e5, "float16", 1.0), (float("nan"), "float16", 1.0),
    (1.0, "float32", 1.0),
])
def test_relu2_scale_keeps_w2_times_its_square_within_half_the_float16_range(largest, dtype, scale):
    assert relu2_scale(largest, dtype) == scale


def test_a_w2_entry_float16_cannot_hold_is_refused_in_one_line_naming_it(tiny_checkpoint, tmp_path):
    checkpoint = with_w2_entry(tiny_checkpoint, str(tmp_path / "checkpoint"), 1e5)
    with pytest.raises(ExportError) as error:
        build(checkpoint, str(tmp_path / "out"), BuildOptions(dtype="float16", kv_capacity=96, backend="onnxruntime"))
    assert str(error.value) == (f"checkpoint tensor '{W2}' has values up to 1e+05, beyond torch.float16 once stored; "
                                f"build with --dtype bfloat16 (for TensorRT) or --dtype float32")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]  # no build, no temporary directory
