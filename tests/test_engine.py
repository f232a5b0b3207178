"""TensorRT engine build: everything that does not need TensorRT is checked here; the build and
the engine itself are tested where `import tensorrt` and a GPU work."""

import os
import shlex

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from persimmon_export.build import build
from persimmon_export.demo import make_demo_checkpoint
from persimmon_export.engine import (EngineError, cache_update_path, check_version, optimization_profiles,
                                     parse_version, polygraphy_command, readiness_problems,
                                     scatter_elements_fallback, tensorrt_version, trtexec_command)
from persimmon_runtime import PersimmonError
from persimmon_runtime.manifest import Manifest

TRT_VERSION, TRT_MISSING = tensorrt_version()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    checkpoint = make_demo_checkpoint(str(root / "ckpt"), seed=2)
    out = {}
    for dtype in ("float16", "float32"):
        out[dtype] = str(root / dtype)
        # the TensorRT graph (static cache length, sliced), exported without TensorRT
        build(checkpoint, out[dtype], dtype=dtype, max_batch=4, max_seq=64, backend="onnxruntime",
              cache_layout="window", progress=lambda *_: None)
    return checkpoint, out


def load(directory):
    return onnx.load(os.path.join(directory, "model.onnx"), load_external_data=False)


def test_versions():
    assert parse_version("10.15.1.29") == (10, 15, 1, 29)
    assert parse_version("11.0.0rc1") == (11, 0, 0)
    assert cache_update_path((10, 15, 1)) == "tensor_scatter" == cache_update_path((11, 2))
    assert cache_update_path((10, 14, 0)) == "scatter_elements"
    check_version((10, 9, 0))
    for bad in ((10, 8, 0), (12, 0)):
        with pytest.raises(EngineError, match="outside the supported range 10.9 - 11.x"):
            check_version(bad)
    with pytest.raises(PersimmonError, match="cannot read the TensorRT version"):
        parse_version("stub")


def test_profiles_cover_prefill_and_decode(built):
    manifest = Manifest.load(built[1]["float16"])
    prefill, decode = optimization_profiles(manifest, max_prefill=32)
    assert set(prefill) == set(decode) == {s["name"] for s in manifest.inputs}
    assert prefill["input_ids"] == ((1, 1), (4, 32), (4, 32))
    assert decode["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert decode["attention_mask"] == ((1, 1), (4, 32), (4, 64))
    heads, capacity, head_dim = manifest.cache_shape
    assert prefill["past_key_0"] == ((1, heads, 64, head_dim), (4, heads, 64, head_dim), (4, heads, 64, head_dim))
    for profile in (prefill, decode):
        for low, opt, high in profile.values():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high))
    with pytest.raises(EngineError, match="--max-prefill must be in"):
        optimization_profiles(manifest, max_prefill=65)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_exported_graph_is_ready_for_tensorrt(built, dtype):
    model = load(built[1][dtype])
    assert readiness_problems(model, (10, 15, 1), plugins=True) == []
    assert readiness_problems(model, (11, 0, 0), plugins=False) == []  # through the function bodies
    old = readiness_problems(model, (10, 12, 0), plugins=True)
    assert old and all("TensorScatter needs TensorRT >= 10.15" in p for p in old)
    assert readiness_problems(scatter_elements_fallback(model), (10, 9, 0), plugins=False) == []


def test_readiness_flags_unsupported_ops_and_mixed_types():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph([helper.make_node("Det", ["y"], ["d"], name="det"),
                               helper.make_node("Add", ["x", "y"], ["z"], name="mixed")], "g", [x, y], [z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    problems = " | ".join(readiness_problems(model, (10, 15), plugins=False))
    assert "node det: Det is not in the TensorRT ONNX parser's supported set" in problems
    assert "type/shape inference fails" in problems and "mixed" in problems


def test_scatter_elements_fallback_computes_the_same_step(built):
    directory = built[1]["float32"]
    manifest = Manifest.load(directory)
    fallback = scatter_elements_fallback(load(directory))
    assert not [n for n in fallback.graph.node if n.op_type == "TensorScatter"]
    path = os.path.join(directory, "fallback-test.onnx")
    onnx.save(fallback, path)  # beside model.onnx: shares model.onnx.data
    try:
        sessions = [ort.InferenceSession(os.path.join(directory, f), providers=["CPUExecutionProvider"])
                    for f in ("model.onnx", "fallback-test.onnx")]
        rng = np.random.default_rng(0)
        feeds = {"input_ids": np.array([[5, 6, 7], [8, 9, 10]], np.int64), "cache_position": np.array([2, 7]),
                 "token_count": np.array([3, 2]), "attention_mask": np.ones((2, 10), np.int64)}
        for name in manifest.cache_inputs:  # a cache with earlier contents, written at two offsets
            feeds[name] = rng.normal(size=(2, *manifest.cache_shape)).astype(np.float32)
        expected, got = (s.run(None, feeds) for s in sessions)
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
    finally:
        os.remove(path)


def test_equivalent_command_lines(built):
    manifest = Manifest.load(built[1]["float16"])
    profiles = optimization_profiles(manifest, max_prefill=16)
    trtexec = shlex.split(trtexec_command("model.onnx", "engine.plan", profiles, (10, 15, 1), True, "timing.cache",
                                          4, 2048))
    assert trtexec[:4] == ["trtexec", "--onnx=model.onnx", "--saveEngine=engine.plan", "--skipInference"]
    assert "--stronglyTyped" in trtexec and "--versionCompatible" in trtexec
    assert trtexec.count("--profile=0") == trtexec.count("--profile=1") == 1
    assert next(a for a in trtexec if a.startswith("--minShapes")).startswith(
        "--minShapes=input_ids:1x1,cache_position:1,token_count:1,attention_mask:1x1,past_key_0:1x")
    assert any(a.startswith("--optShapes=input_ids:4x16,") for a in trtexec)
    assert "--memPoolSize=workspace:2048M" in trtexec and "--timingCacheFile=timing.cache" in trtexec
    assert "--stronglyTyped" not in trtexec_command("m", "e", profiles, (11, 0), False, None, 3, None)
    poly = shlex.split(polygraphy_command("model.onnx", "engine.plan", profiles, False, None, 3, None))
    assert poly[:7] == ["polygraphy", "convert", "model.onnx", "--convert-to", "trt", "-o", "engine.plan"]
    assert poly.count("--trt-min-shapes") == 2 and "input_ids:[4,16]" in poly


@pytest.mark.skipif(TRT_VERSION is None, reason=f"TensorRT is not available here: {TRT_MISSING}")
def test_tiny_engine_matches_torch_and_onnxruntime(built, tmp_path):
    from persimmon_export.parity import check_parity

    checkpoint, _ = built
    out = str(tmp_path / "trt")
    build(checkpoint, out, dtype="float16", max_batch=4, max_seq=64, backend="tensorrt", max_prefill=32,
          progress=lambda *_: None)
    results = check_parity(checkpoint, out, decode_steps=16, backends=("tensorrt", "onnxruntime"), device="cuda",
                           progress=lambda *_: None)
    assert all(r.passed for r in results), [r.line() for r in results]


def test_runtime_refuses_a_mismatched_engine_with_the_reason():
    from persimmon_runtime.backends.tensorrt import check_engine_compatible

    section = {"version": "10.15.1.29", "compute_capability": "9.0", "version_compatible": False}
    check_engine_compatible(section, "10.15.1.29", "9.0")
    with pytest.raises(PersimmonError, match=r"built with TensorRT 10.15.1.29; this machine has 11.0.0.*"
                                             r"--version-compatible"):
        check_engine_compatible(section, "11.0.0", "9.0")
    with pytest.raises(PersimmonError, match=r"compute capability 9.0; this GPU has 8.0"):
        check_engine_compatible(section, "10.15.1.29", "8.0")
    compatible = {**section, "version_compatible": True}
    check_engine_compatible(compatible, "11.2.0", "9.0")  # loads on newer TensorRT
    with pytest.raises(PersimmonError, match=r"loads on 10.15.1.29 or newer\); this machine has 10.14"):
        check_engine_compatible(compatible, "10.14.0", "9.0")


def test_tensorrt_backend_errors_are_clear_without_tensorrt(built, tmp_path):
    from persimmon_runtime.generator import Generator

    directory = built[1]["float16"]
    with pytest.raises(PersimmonError, match="this build has no TensorRT engine; rebuild it with"):
        Generator.load(directory, backend="tensorrt")
    assert Generator.load(directory).backend.name == "onnxruntime"  # auto falls back


@pytest.mark.skipif(TRT_VERSION is not None, reason="TensorRT is installed here")
def test_build_for_tensorrt_without_it_is_one_clear_error(built, tmp_path):
    from persimmon_export.build import build as build_dir

    with pytest.raises(PersimmonError, match="--backend tensorrt: tensorrt is not importable"):
        build_dir(built[0], str(tmp_path / "trt"), backend="tensorrt", progress=lambda *_: None)
    assert not (tmp_path / "trt").exists()


def test_doctor_reports_every_item_with_reasons():
    from persimmon_export.doctor import report

    findings = dict(report())
    assert list(findings) == ["persimmon-deploy", "python", "torch", "onnx", "onnxruntime", "polygraphy",
                              "tensorrt", "cuda-python", "gpu", "plugins"]
    assert "CPUExecutionProvider" in findings["onnxruntime"]
    if TRT_VERSION is None:
        assert findings["tensorrt"].startswith("unavailable: ")
    assert findings["plugins"].startswith("kernels compile with") or findings["plugins"].startswith("nvcc not found")
