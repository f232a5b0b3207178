"""bfloat16 builds: a strongly typed bf16 graph (fp32 LayerNorm statistics, softmax and logits),
built into a TensorRT-RTX engine without a GPU, checked numerically by the true-bf16 evaluation
against the fp32 build; onnxruntime cannot run it, and says so."""

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import error_line
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file

from persimmon_export import cli as export_cli
from persimmon_export.build import build
from persimmon_export.engine.tensorrt import TENSORRT_RTX, EngineOptions, parse_onnx
from persimmon_export.options import BuildOptions
from persimmon_export.validate.emulate import EmulatedBackend, true_precision_evaluator
from persimmon_export.validate.parity import check_parity
from persimmon_runtime import PersimmonError, Tokenizer
from persimmon_runtime.backends import decode, prefill
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import Manifest

RTX_VERSION, RTX_MISSING = TENSORRT_RTX.installed()
PROMPTS = ["human: What is the capital of France?\n\nadept:", "The quick brown"]
# bf16 against fp32, as a fraction of the largest |logit|. bf16 keeps 8 significant bits to
# fp16's 11, so each rounding is up to 2^-9 relative instead of 2^-12: 8x fp16's. The emulated
# fp16 build of the same checkpoint differs from fp32 by 0.17% of max|logit| (tests/test_emulate.py),
# so bf16 is expected near 8 x 0.17% = 1.4%; 5% leaves 3x that for roundings adding up one way.
# Observed: 1.6% (4.9e-2 on logits up to 3.85) over the prefill and 4 decode steps.
BF16_BOUND = 0.05


@pytest.fixture(scope="module")
def bf16_build(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as a bfloat16 TensorRT-RTX build (no GPU needed to build)."""
    if RTX_VERSION is None:
        pytest.skip(f"TensorRT-RTX is not installed: {RTX_MISSING}")
    out = str(tmp_path_factory.mktemp("bf16") / "build")
    build(tiny_checkpoint, out, BuildOptions(dtype="bfloat16", backend="tensorrt-rtx", max_batch=2, kv_capacity=64,
                                             engine=EngineOptions(max_prefill=16)))
    return out


def prompt_ids(checkpoint):
    tokenizer = Tokenizer.from_dir(checkpoint)
    return [tokenizer.encode(p) for p in PROMPTS]


def test_weights_are_stored_as_the_bf16_rounding_of_the_checkpoint(tiny_checkpoint, bf16_build):
    """No relu^2 scale (bf16 has fp32's range): every weight is ml_dtypes' round-to-nearest-even
    bf16 of the checkpoint's value, LayerNorm parameters stay fp32, linear weights are [in, out]."""
    model = onnx.load(os.path.join(bf16_build, "model.onnx"))
    checkpoint = {name: w.float().numpy() for name, w in load_file(os.path.join(tiny_checkpoint,
                                                                               "model.safetensors")).items()}
    assert {p.name for p in model.graph.initializer} == set(checkpoint)
    for proto in model.graph.initializer:
        stored, weight = numpy_helper.to_array(proto), checkpoint[proto.name]
        if "layernorm" in proto.name:
            assert proto.data_type == TensorProto.FLOAT
            assert np.array_equal(stored, weight), proto.name
            continue
        assert proto.data_type == TensorProto.BFLOAT16 and stored.dtype == ml_dtypes.bfloat16, proto.name
        linear = weight.ndim == 2 and proto.name != "model.embed_tokens.weight"  # stored [in, out] for MatMul
        expected = (weight.T if linear else weight).astype(ml_dtypes.bfloat16)
        assert np.array_equal(stored.view(np.uint16), expected.view(np.uint16)), proto.name
    manifest = Manifest.load(bf16_build, verify_checksums=True)
    assert manifest.dtype == "bfloat16" and manifest.ranges is None
    caches = [spec for spec in manifest.onnx.inputs if spec.name.startswith("past_")]
    assert caches and {spec.dtype for spec in caches} == {"bfloat16"}
    assert [(spec.name, spec.dtype) for spec in manifest.onnx.outputs][0] == ("logits", "float32")


@pytest.mark.skipif(RTX_VERSION is None, reason=f"TensorRT-RTX is not installed: {RTX_MISSING}")
def test_the_rtx_engine_is_built_from_a_bf16_network_with_fp32_islands(bf16_build):
    import tensorrt_rtx as trt

    manifest = Manifest.load(bf16_build)
    assert manifest.tensorrt.flavor == "tensorrt-rtx"
    assert os.path.getsize(os.path.join(bf16_build, "engine.plan")) > 100_000  # a serialized engine, not a stub
    network = parse_onnx(TENSORRT_RTX, os.path.join(bf16_build, manifest.tensorrt.onnx_file)).network
    assert network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    inputs = {network.get_input(i).name: network.get_input(i).dtype for i in range(network.num_inputs)}
    assert {dtype for name, dtype in inputs.items() if name.startswith("past_")} == {trt.bfloat16}
    assert network.get_output(0).name == "logits" and network.get_output(0).dtype == trt.float32
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    matmuls = [layer.get_output(0).dtype for layer in layers if layer.type == trt.LayerType.MATRIX_MULTIPLY]
    # per layer qkv, scores, probs @ v, dense, h_to_4h, 4h_to_h; then lm_head: all in bf16
    assert matmuls == [trt.bfloat16] * (6 * manifest.model.num_hidden_layers + 1)
    # the fp32 islands: LayerNorm statistics and softmax
    for kind in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX):
        assert {layer.get_output(0).dtype for layer in layers if layer.type == kind} == {trt.float32}
    updates = [layer for layer in layers if layer.type == trt.LayerType.KV_CACHE_UPDATE]
    assert len(updates) == 2 * manifest.model.num_hidden_layers


def test_the_evaluator_rounds_every_bf16_result():
    """What the emulation rests on: a bf16 Add in onnx's reference evaluator is rounded to bf16
    (round to nearest even), not left in fp32: bf16's spacing at 1 is 2^-7, so 1 + 2^-8 is a tie
    (to 1, the even one) and 1 + 3 * 2^-9 rounds up to 1 + 2^-7."""
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add",
                              [helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [2]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.BFLOAT16, [2])])
    evaluator = true_precision_evaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)]))
    a = np.array([1, 1], ml_dtypes.bfloat16)
    b = np.array([2.0 ** -8, 3 * 2.0 ** -9], ml_dtypes.bfloat16)
    (c,) = evaluator.run(None, {"a": a, "b": b})
    assert c.dtype == ml_dtypes.bfloat16 and c.astype(np.float32).tolist() == [1.0, 1 + 2.0 ** -7]


def test_emulated_bf16_agrees_with_onnxruntime_fp32(tiny_checkpoint, tiny_build, bf16_build):
    prompts = prompt_ids(tiny_checkpoint)
    fp32 = Generator.load(tiny_build, backend="onnxruntime").backend
    emulated = EmulatedBackend(bf16_build)
    expected, positions = prefill(fp32, prompts)
    got, _ = prefill(emulated, prompts)
    steps = [(got, expected)]
    for _ in range(4):  # decode steps on the emulated bf16 caches, fed the fp32 tokens
        tokens = expected.argmax(-1)
        got = decode(emulated, tokens, positions.copy())
        expected = decode(fp32, tokens, positions)
        steps.append((got, expected))
    assert all(cache.dtype == ml_dtypes.bfloat16 for cache in emulated.caches.values())
    worst = max(np.abs(got - expected).max() / np.abs(expected).max() for got, expected in steps)
    assert all(np.isfinite(got).all() for got, _ in steps)
    assert worst <= BF16_BOUND
    assert worst > 1e-4  # bf16 arithmetic happened: fp32 arithmetic agrees to ~1e-6


def test_onnxruntime_cannot_run_bf16_and_both_ends_say_so(tiny_checkpoint, bf16_build, tmp_path):
    # the fact the refusals rest on: if a later onnxruntime runs this graph, they can go
    with pytest.raises(Exception, match=r"NOT_IMPLEMENTED.*MatMul"):
        ort.InferenceSession(os.path.join(bf16_build, "model.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(PersimmonError) as refused:
        Generator.load(bf16_build, backend="onnxruntime")
    message = str(refused.value)
    assert "\n" not in message and "a bfloat16 build does not run on onnxruntime" in message
    assert "run its TensorRT engine on a GPU" in message
    command = [os.path.join(os.path.dirname(sys.executable), "persimmon-export"), "build", "--checkpoint",
               tiny_checkpoint, "--out", str(tmp_path / "ort"), "--dtype", "bfloat16", "--backend", "onnxruntime"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and error_line(result.stderr), result.stderr
    assert "--dtype bfloat16 builds run only as TensorRT engines" in result.stderr
    assert "add --backend tensorrt or --backend tensorrt-rtx" in result.stderr
    assert not (tmp_path / "ort").exists()


def test_bf16_needs_no_relu2_scale_where_fp16_overflows(tiny_checkpoint, tiny_build, tmp_path):
    """A layer-0 MLP unit reaching 4200 before relu^2 (relu^2 = 1.8e7: fp16 overflows, and the
    float16 build is refused, tests/test_emulate.py) is an ordinary bf16 number: the bf16 build
    stores the weights unscaled and computes what the fp32 build computes, within the bound."""
    if RTX_VERSION is None:
        pytest.skip(f"TensorRT-RTX is not installed: {RTX_MISSING}")
    from test_emulate import with_large_mlp_unit

    prompts = prompt_ids(tiny_checkpoint)
    checkpoint = with_large_mlp_unit(tiny_checkpoint, str(tmp_path / "ckpt"), prompts, 4200.0)
    out = str(tmp_path / "build")
    build(checkpoint, out, BuildOptions(dtype="bfloat16", backend="tensorrt-rtx", max_batch=2, kv_capacity=64,
                                        engine=EngineOptions(max_prefill=16)))
    got, _ = prefill(EmulatedBackend(out), prompts)
    expected, _ = prefill(Generator.load(tiny_build, backend="onnxruntime").backend, prompts)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= BF16_BOUND * np.abs(expected).max()


def test_parity_checks_a_bf16_build_by_emulation_alone(tiny_checkpoint, bf16_build, capsys):
    """No backend runs a bfloat16 build on a CPU machine: `parity --emulate --backend` (none) checks
    the true-bf16 evaluation against the fp32 reference with the bfloat16 bounds."""
    two = ["human: hi\n\nadept:", "The quick brown"]  # the build's max_batch
    [result] = check_parity(tiny_checkpoint, bf16_build, prompts=two, decode_steps=4, backends=(), emulate=True)
    assert result.backend == "emulated" and result.dtype == "bfloat16" and result.passed
    assert 0 < result.max_abs_diff <= result.bound
    code = export_cli.main(["parity", "--checkpoint", tiny_checkpoint, "--build", bf16_build, "--steps", "2",
                            "--prompt", two[0], "--prompt", two[1], "--emulate", "--backend"])
    assert code == 0 and "emulated     bfloat16" in capsys.readouterr().out
    with pytest.raises(PersimmonError, match="nothing to check: name a backend in --backend, or pass --emulate"):
        check_parity(tiny_checkpoint, bf16_build, prompts=two, backends=())
