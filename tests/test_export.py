"""ONNX export: graph structure, custom ops, checker, and per-step parity with the torch reference."""

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc

from persimmon_export.build import build
from persimmon_export.config import PersimmonConfig
from persimmon_export.demo import make_demo_checkpoint
from persimmon_export.engine.tensorrt import TENSORRT_RTX
from persimmon_export.graph.export import ExportError, export_onnx
from persimmon_export.load.checkpoint import CheckpointError, load_model
from persimmon_export.options import BuildOptions
from persimmon_export.validate.parity import check_parity
from persimmon_runtime import PersimmonError
from persimmon_runtime.backends.step import step_feeds as graph_feeds
from persimmon_runtime.custom_ops import QK_LAYERNORM_OP, ROTARY_OP
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import CustomOps, Manifest

CONFIGS = {
    "base": {},
    # head_dim 24 (not a power of two), no QK LayerNorm, 3 heads
    "head24_no_qkln": dict(hidden_size=72, num_attention_heads=3, intermediate_size=160, qk_layernorm=False),
    # full rotary with linear rope scaling, 3 layers
    "full_rotary_linear": dict(hidden_size=80, num_attention_heads=4, intermediate_size=192, num_hidden_layers=3,
                               partial_rotary_factor=1.0, rope_scaling={"type": "linear", "factor": 2.0}),
}
PROMPTS = ["human: What is the capital of France?\n\nadept:", "The quick brown", "🎉"]


def step_feeds(manifest, ids, slots):
    """Prefill feeds for a direct session run: empty caches (of `slots` slots where their length is a
    graph dimension, the `whole` layout; else of kv_capacity slots), a mask `slots` wide."""
    heads, capacity, head_dim = manifest.cache_shape
    cache_slots = slots if manifest.onnx.cache_layout == "whole" else capacity
    dtype = np.float16 if manifest.dtype == "float16" else np.float32
    feeds = graph_feeds(manifest.step_inputs, ids, np.zeros(1, np.int64), np.array([ids.shape[1]], np.int64),
                        np.ones((1, slots), np.int64))
    feeds.update({name: np.zeros((1, heads, cache_slots, head_dim), dtype) for name in manifest.cache_inputs})
    return feeds


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_demo_checkpoint(str(root / name), seed=i, **fields)
            for i, (name, fields) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="module")
def builds(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("builds")
    out = {}
    for name, checkpoint in checkpoints.items():
        out[name, "float32"] = str(root / f"{name}-fp32")
        build(checkpoint, out[name, "float32"], BuildOptions(dtype="float32", max_batch=4, kv_capacity=128,
                                                             backend="onnxruntime"))
    out["base", "float16"] = str(root / "base-fp16")
    build(checkpoints["base"], out["base", "float16"], BuildOptions(dtype="float16", max_batch=4, kv_capacity=128,
                                                                    backend="onnxruntime"))
    return out


def test_build_directory_is_self_describing(builds):
    directory = builds["base", "float16"]
    assert sorted(os.listdir(directory)) == [".persimmon-export", "genai_config.json", "manifest.json", "model.onnx",
                                             "model.onnx.data", "tokenizer.model", "tokenizer_config.json"]
    manifest = Manifest.load(directory, verify_checksums=True)
    assert (manifest.dtype, manifest.kv_capacity, manifest.max_batch) == ("float16", 128, 4)
    assert manifest.onnx.custom_ops == CustomOps("persimmon", 1, [QK_LAYERNORM_OP, ROTARY_OP])
    assert manifest.cache_aliases["present_key_0"] == "past_key_0"
    # what onnxruntime-genai feeds an onnxruntime (`capacity`) build, and the logits shape it reads
    assert manifest.step_inputs == ["input_ids", "attention_mask"]
    assert manifest.logits_shape == ["batch", 1, manifest.model.vocab_size]
    assert manifest.files["model.onnx.data"].bytes == os.path.getsize(os.path.join(directory, "model.onnx.data"))


def test_custom_domain_nodes_carry_function_bodies(builds):
    model = onnx.load(os.path.join(builds["base", "float16"], "model.onnx"), load_external_data=False)
    custom = [n for n in model.graph.node if n.domain == "persimmon"]
    assert {n.op_type for n in custom} == {QK_LAYERNORM_OP, ROTARY_OP}
    assert len(custom) == 2 * 3  # per layer: one QK LayerNorm, rotary on q and on k
    for node in custom:
        attrs = {a.name: a for a in node.attribute}
        assert attrs["plugin_version"].s == b"1" and attrs["plugin_namespace"].s == b"persimmon"
    functions = {f.name: f for f in model.functions}
    assert set(functions) == {QK_LAYERNORM_OP, ROTARY_OP}
    for function in functions.values():
        assert function.domain == "persimmon"
        assert {n.domain for n in function.node} == {""}  # bodies use standard ops only
    assert {"LayerNormalization", "CastLike"} <= {n.op_type for n in functions[QK_LAYERNORM_OP].node}
    # onnxruntime builds (cache layout `capacity`) attend with onnxruntime's own GroupQueryAttention
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), ("persimmon", 1), ("com.microsoft", 1)}
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == 2  # one per layer, 2 layers


@pytest.mark.skipif(TENSORRT_RTX.installed()[0] is None, reason="TensorRT-RTX is not installed")
def test_tensorrt_has_no_importer_of_its_own_for_the_custom_ops():
    """TensorRT's parser looks importers up by op name, whatever the domain: a built-in one named
    like ours would be used instead of our function bodies (or plugins)."""
    import tensorrt_rtx as trt

    logger = trt.Logger(trt.Logger.ERROR)
    parser = trt.OnnxParser(trt.Builder(logger).create_network(0), logger)
    assert parser.supports_operator("LayerNormalization") and parser.supports_operator("TensorScatter")
    for op in (QK_LAYERNORM_OP, ROTARY_OP):
        assert not parser.supports_operator(op), op


def test_checker_and_shape_inference_pass(builds):
    path = os.path.join(builds["base", "float16"], "model.onnx")
    onnx.checker.check_model(path, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False), strict_mode=True)
    logits = next(o for o in inferred.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 logits from an fp16 graph


def test_fp16_graph_keeps_statistics_softmax_and_logits_in_fp32(builds):
    model = onnx.load(os.path.join(builds["base", "float16"], "model.onnx"), load_external_data=False)
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types["model.layers.0.input_layernorm.weight"] == onnx.TensorProto.FLOAT
    assert types["model.layers.0.mlp.dense_h_to_4h.weight"] == onnx.TensorProto.FLOAT16
    inferred = onnx.shape_inference.infer_shapes(model)
    value_types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for node in inferred.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert value_types[node.input[0]] == onnx.TensorProto.FLOAT, node.name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_per_step_logits_match_torch_through_prefill_and_64_decode_steps(checkpoints, builds, name):
    [result] = check_parity(checkpoints[name], builds[name, "float32"], prompts=PROMPTS, decode_steps=64)
    assert result.max_abs_diff <= 1e-4, result.line()
    assert result.top1_agreement == 1.0 and result.greedy_rows_identical == len(PROMPTS)


def test_single_prompt_batch(checkpoints, builds):
    [result] = check_parity(checkpoints["base"], builds["base", "float32"], prompts=["x"], decode_steps=8)
    assert result.max_abs_diff <= 1e-4


def test_fp16_graph_error_against_fp32_is_within_the_stated_bound(checkpoints, builds):
    [result] = check_parity(checkpoints["base"], builds["base", "float16"], prompts=PROMPTS, decode_steps=64)
    # stated bound: 2% of the largest |logit| (the parity command's default for fp16)
    assert result.passed, result.line()
    assert result.max_abs_diff <= result.bound


def test_polygraphy_comparison_of_a_prefill_step_against_torch(checkpoints, builds):
    directory = builds["head24_no_qkln", "float32"]
    manifest = Manifest.load(directory)
    ids = np.array([[3, 17, 42, 99, 5]], np.int64)
    feeds = step_feeds(manifest, ids, slots=8)
    onnxrt = Comparator.run([OnnxrtRunner(SessionFromOnnx(os.path.join(directory, "model.onnx")))],
                            data_loader=[feeds])
    with torch.no_grad():
        expected = load_model(checkpoints["head24_no_qkln"])(torch.tensor(ids))[:, -1].numpy()
    reference = RunResults()
    reference.append(("torch-reference", [IterationResult(outputs={"logits": expected}, runner_name="torch-reference")]))
    onnxrt_logits = RunResults()
    name, iterations = onnxrt[0]
    logits = iterations[0]["logits"].reshape(expected.shape)  # [1, 1, vocab]: the last position's
    onnxrt_logits.append((name, [IterationResult(outputs={"logits": logits}, runner_name=name)]))
    onnxrt_logits.extend(reference)
    accuracy = Comparator.compare_accuracy(onnxrt_logits, compare_func=SimpleCompareFunc(atol=1e-4, rtol=0))
    assert bool(accuracy)


def test_greedy_generation_through_the_runtime_equals_transformers_generate(checkpoints, builds):
    generator = Generator.load(builds["full_rotary_linear", "float32"])
    completions = generator.generate(PROMPTS, max_new_tokens=40, ignore_eos=True)
    hf = transformers.PersimmonForCausalLM.from_pretrained(checkpoints["full_rotary_linear"]).eval()
    for prompt, completion in zip(PROMPTS, completions):
        ids = generator.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(ids):].tolist()
        assert completion.token_ids == expected


def test_model_runs_in_a_fresh_onnxruntime_session_without_custom_op_library(builds):
    directory = builds["base", "float16"]
    session = ort.InferenceSession(os.path.join(directory, "model.onnx"), providers=["CPUExecutionProvider"])
    manifest = Manifest.load(directory)
    assert manifest.onnx.cache_layout == "capacity"  # onnxruntime builds: GroupQueryAttention over kv_capacity slots
    feeds = step_feeds(manifest, np.array([[1, 2, 3]], np.int64), slots=8)
    logits, present_key_0 = session.run(["logits", "present_key_0"], feeds)
    assert logits.shape == (1, 1, manifest.model.vocab_size) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert np.abs(present_key_0[0, :, :3]).sum() > 0 and not present_key_0[0, :, 3:].any()  # written at slots 0..2


def test_cache_is_updated_in_place_through_io_binding(builds):
    generator = Generator.load(builds["base", "float32"])
    backend = generator.backend
    backend.start(2)
    before = [value.data_ptr() for value in backend.caches]
    backend.step(np.array([[5, 6, 7], [8, 9, 4]]), np.zeros(2, np.int64), np.array([3, 3]), np.ones((2, 3), np.int64))
    host = backend._host_caches[0]  # the numpy array the first cache OrtValue borrows
    assert np.abs(host[:, :, :3]).sum() > 0 and not host[:, :, 3:].any()  # the step wrote into our buffer
    outputs = [o.data_ptr() for o in backend._bindings[backend.session].binding.get_outputs()]
    assert len(outputs) == len(before) + 1 and set(before) <= set(outputs)  # present_* are the very past_* buffers


DYNAMIC = dict(max_position_embeddings=64, rope_scaling={"type": "dynamic", "factor": 2.0})


def test_dynamic_rope_scaling_up_to_max_position_embeddings_matches_transformers(tmp_path):
    """Dynamic NTK changes the frequencies only past max_position_embeddings: a build whose cache
    ends there (kv_capacity 64 = max_position_embeddings) must equal transformers at every position."""
    checkpoint = make_demo_checkpoint(str(tmp_path / "dyn"), seed=5, **DYNAMIC)
    out = str(tmp_path / "build")
    build(checkpoint, out, BuildOptions(dtype="float32", max_batch=1, kv_capacity=64, backend="onnxruntime"))
    manifest = Manifest.load(out)
    session = ort.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
    hf = transformers.PersimmonForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.randint(3, manifest.model.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    for length in (5, 64):  # 64: the last position, 63, is the last one before scaling would start
        [logits] = session.run(["logits"], step_feeds(manifest, ids[:, :length].numpy(), slots=length))
        with torch.no_grad():
            expected = hf(ids[:, :length]).logits[:, -1].numpy()
        assert np.abs(logits - expected).max() <= 1e-4, length
    generator = Generator.load(out)  # and decode steps up to the full cache
    prompt = generator.tokenizer.encode(PROMPTS[1])
    completion = generator.generate(PROMPTS[1], max_new_tokens=64 - len(prompt), ignore_eos=True)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=64 - len(prompt), do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert completion.token_ids == expected


def test_dynamic_rope_scaling_past_max_position_embeddings_is_refused_in_one_line(tmp_path):
    checkpoint = make_demo_checkpoint(str(tmp_path / "dyn"), **DYNAMIC)
    with pytest.raises(ExportError, match=r"--kv-capacity must be in \[2, max_position_embeddings=64\], got 128"):
        build(checkpoint, str(tmp_path / "out"), BuildOptions(kv_capacity=128, backend="onnxruntime"))
    assert not os.path.exists(tmp_path / "out")
    config = PersimmonConfig.from_file(checkpoint)  # export's own check, for callers of export_onnx
    with pytest.raises(ExportError) as error:
        export_onnx(config, [], str(tmp_path), dtype="float32", kv_capacity=128)
    assert str(error.value) == ("rope_scaling 'dynamic' is exported only with --kv-capacity <= max_position_embeddings "
                                "(64), got --kv-capacity 128: past it the frequencies change with the sequence length")
    assert sorted(os.listdir(tmp_path)) == ["dyn"]


def test_failed_build_leaves_the_old_directory_and_no_temp(checkpoints, builds, tmp_path):
    out = tmp_path / "build"
    shutil.copytree(builds["base", "float32"], out)
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["base"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape"):
        build(str(broken), str(out), BuildOptions(dtype="float32", kv_capacity=128, backend="onnxruntime",
                                                  overwrite=True))
    assert sorted(os.listdir(tmp_path)) == ["broken", "build"]
    Manifest.load(str(out), verify_checksums=True)  # the previous build is intact


def test_bad_build_options(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="--kv-capacity must be in"):
        build(checkpoints["base"], str(tmp_path / "o"), BuildOptions(kv_capacity=10**6, backend="onnxruntime"))
    with pytest.raises(ExportError, match="--max-batch must be in 1..1024"):
        build(checkpoints["base"], str(tmp_path / "o"), BuildOptions(max_batch=0, backend="onnxruntime"))
    with pytest.raises(PersimmonError, match="not a directory"):
        build(str(tmp_path / "missing"), str(tmp_path / "o"), BuildOptions(backend="onnxruntime"))


def test_truncated_or_missing_build_files_are_refused(builds, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(builds["base", "float32"], copy)
    with open(copy / "model.onnx.data", "r+b") as f:
        f.truncate(100)
    with pytest.raises(PersimmonError, match=r"model\.onnx\.data: 100 bytes, the manifest says"):
        Generator.load(str(copy))
    shutil.copyfile(os.path.join(builds["base", "float32"], "model.onnx.data"), copy / "model.onnx.data")
    os.remove(copy / "tokenizer.model")
    with pytest.raises(PersimmonError, match=r"tokenizer\.model: listed in the manifest but missing"):
        Generator.load(str(copy))
    with pytest.raises(PersimmonError, match=r"manifest\.json: not found"):
        Generator.load(str(tmp_path))
