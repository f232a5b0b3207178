"""TensorRT engine builds.

Everything that needs neither TensorRT nor a GPU is checked directly. Where TensorRT-RTX is
installed (examples/setup.sh installs it on Linux x86_64, so in CI) real engines are built from
tiny checkpoints without a GPU and the parsed networks and build results are checked. Running
an engine needs a GPU: those tests are marked `gpu` and skip without one.
"""

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import transformers_checkpoint
from manifest_parts import engine_section
from onnx import TensorProto, helper

from persimmon_export.build import build
from persimmon_export.demo import make_demo_checkpoint
from persimmon_export.engine.tensorrt import (
    TENSORRT,
    TENSORRT_RTX,
    EngineError,
    EngineOptions,
    builder_config,
    choose_targets,
    optimization_profiles,
    parse_onnx,
    parse_version,
    polygraphy_command,
    scatter_elements_fallback,
    trtexec_command,
)
from persimmon_export.options import BuildOptions
from persimmon_export.progress import build_monitor
from persimmon_runtime import PersimmonError
from persimmon_runtime.backends.cuda import compute_capability
from persimmon_runtime.manifest import FileEntry, Manifest, ManifestError
from persimmon_runtime.verify import IntegrityError

TRT_VERSION, TRT_MISSING = TENSORRT.installed()
RTX_VERSION, RTX_MISSING = TENSORRT_RTX.installed()
GPU = compute_capability()  # 'unknown' without a GPU (or without cuda-python)
needs_rtx = pytest.mark.skipif(RTX_VERSION is None, reason=f"TensorRT-RTX is not installed: {RTX_MISSING}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    checkpoint = make_demo_checkpoint(str(root / "ckpt"), seed=2)
    out = {}
    for dtype in ("float16", "float32"):
        out[dtype] = str(root / dtype)
        # the TensorRT graph (static cache length, sliced), exported without TensorRT
        build(checkpoint, out[dtype], BuildOptions(dtype=dtype, max_batch=4, kv_capacity=64, backend="onnxruntime",
                                                   cache_layout="window"))
    return checkpoint, out


def load(directory):
    return onnx.load(os.path.join(directory, "model.onnx"), load_external_data=False)


def test_versions():
    assert parse_version("10.15.1.29") == (10, 15, 1, 29)
    assert parse_version("11.0.0rc1") == (11, 0, 0)
    assert TENSORRT.cache_update_path((10, 15, 1)) == "tensor_scatter" == TENSORRT.cache_update_path((11, 2))
    assert TENSORRT.cache_update_path((10, 14, 0)) == "scatter_elements"
    assert TENSORRT_RTX.cache_update_path((1, 7, 1, 116)) == "tensor_scatter"
    TENSORRT.check_version((10, 9, 0))
    TENSORRT_RTX.check_version((1, 7, 1, 116))
    for bad in ((10, 8, 0), (12, 0)):
        with pytest.raises(EngineError, match="TensorRT .* is outside the supported range 10.9 - 11.x"):
            TENSORRT.check_version(bad)
    for bad in ((1, 6, 0), (2, 0), (10, 15)):  # a TensorRT version is not a TensorRT-RTX one
        with pytest.raises(EngineError, match="TensorRT-RTX .* is outside the supported range 1.7 - 1.x"):
            TENSORRT_RTX.check_version(bad)
    with pytest.raises(PersimmonError, match="cannot read the TensorRT version"):
        parse_version("stub")


def test_profiles_cover_prefill_and_decode(built):
    manifest = Manifest.load(built[1]["float16"])
    prefill, decode = optimization_profiles(manifest, max_prefill=32)
    assert set(prefill) == set(decode) == {spec.name for spec in manifest.onnx.inputs}
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


def _one_node_graph(node, inputs, output, *, opsets=(("", 24),)):
    return helper.make_model(helper.make_graph([node], "g", inputs, [output]),
                             opset_imports=[helper.make_opsetid(domain, v) for domain, v in opsets])


def _value(name, elem_type, shape):
    return helper.make_tensor_value_info(name, elem_type, shape)


HALF, FLOAT = TensorProto.FLOAT16, TensorProto.FLOAT
REJECTED_GRAPHS = {  # graphs onnx accepts and TensorRT cannot build, with the reason the parser gives
    "an op it lacks": (_one_node_graph(helper.make_node("Det", ["y"], ["z"], name="det"),
                                       [_value("y", FLOAT, [2, 2])], _value("z", FLOAT, [])), "node 0 det (Det): "),
    "mixed input types": (_one_node_graph(helper.make_node("Add", ["x", "y"], ["z"], name="mixed"),
                                          [_value("x", HALF, [2, 2]), _value("y", FLOAT, [2, 2])],
                                          _value("z", FLOAT, [2, 2])), "must have same input types"),
    "a custom op without function body or plugin": (
        _one_node_graph(helper.make_node("QKLayerNorm", ["y"], ["z"], name="bodiless", domain="persimmon"),
                        [_value("y", FLOAT, [2, 2])], _value("z", FLOAT, [2, 2]),
                        opsets=(("", 24), ("persimmon", 1))), "node 0 bodiless (QKLayerNorm): "),
    "TensorScatter on the heads axis": (
        _one_node_graph(helper.make_node("TensorScatter", ["past", "update", "write"], ["present"], name="scatter",
                                         axis=1),
                        [_value("past", HALF, [1, 2, 8, 4]), _value("update", HALF, [1, 2, 1, 4]),
                         _value("write", TensorProto.INT64, [1])], _value("present", HALF, [1, 2, 8, 4])),
        "Sequence dimension must be -2"),
}


@needs_rtx
@pytest.mark.parametrize("case", sorted(REJECTED_GRAPHS))
def test_the_parser_judges_what_builds_and_says_why_in_one_line(tmp_path, case):
    """No hand-copied op table: what TensorRT cannot build, its own parser refuses, naming the node."""
    model, reason = REJECTED_GRAPHS[case]
    onnx.checker.check_model(model)  # valid ONNX: only TensorRT refuses it
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(EngineError) as error:
        parse_onnx(TENSORRT_RTX, str(path), shown_as="/builds/b")
    message = str(error.value)
    assert message.startswith("/builds/b/model.onnx: the TensorRT-RTX ") and "ONNX parser rejects it: " in message
    assert reason in message and "\n" not in message


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
        feeds = {"input_ids": np.array([[5, 6, 7], [8, 9, 10]], np.int64), "first_slot": np.array([2, 7]),
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
        "--minShapes=input_ids:1x1,first_slot:1,token_count:1,attention_mask:1x1,past_key_0:1x")
    assert any(a.startswith("--optShapes=input_ids:4x16,") for a in trtexec)
    assert "--memPoolSize=workspace:2048M" in trtexec and "--timingCacheFile=timing.cache" in trtexec
    assert "--stronglyTyped" not in trtexec_command("m", "e", profiles, (11, 0), False, None, 3, None)
    poly = shlex.split(polygraphy_command("model.onnx", "engine.plan", profiles, False, None, 3, None))
    assert poly[:7] == ["polygraphy", "convert", "model.onnx", "--convert-to", "trt", "-o", "engine.plan"]
    assert poly.count("--trt-min-shapes") == 2 and "input_ids:[4,16]" in poly
    assert "--compute-capabilities" not in poly  # TensorRT builds for its own GPU
    rtx = shlex.split(polygraphy_command("model.onnx", "engine.plan", profiles, False, None, 3, None,
                                         TENSORRT_RTX, ["8.6", "12.0"]))
    assert rtx[:3] == ["env", "POLYGRAPHY_USE_TENSORRT_RTX=1", "polygraphy"]  # chosen at Polygraphy's import
    assert rtx[rtx.index("--compute-capabilities") + 1:][:2] == ["8.6", "12.0"]


def test_runtime_refuses_a_mismatched_engine_with_the_reason():
    from persimmon_runtime.backends.tensorrt import check_engine_compatible

    section = engine_section(version="10.15.1.29", compute_capabilities=["9.0"], version_compatible=False)
    check_engine_compatible(section, "10.15.1.29", "9.0")
    with pytest.raises(PersimmonError, match=r"runs on TensorRT 10.15.1.29 on a GPU of compute capability 9.0; "
                                             r"this machine has TensorRT 11.0.0.*--version-compatible"):
        check_engine_compatible(section, "11.0.0", "9.0")
    with pytest.raises(PersimmonError, match=r"compute capability 9.0; this GPU has compute capability 8.0: "
                                             r"rebuild it here with `persimmon-export build --backend tensorrt`"):
        check_engine_compatible(section, "10.15.1.29", "8.0")
    compatible = engine_section(version="10.15.1.29", compute_capabilities=["9.0"], version_compatible=True)
    check_engine_compatible(compatible, "11.2.0", "9.0")  # loads on newer TensorRT
    with pytest.raises(PersimmonError, match=r"TensorRT 10.15.1.29 or newer .*\(version compatible\); this machine "
                                             r"has TensorRT 10.14"):
        check_engine_compatible(compatible, "10.14.0", "9.0")


def test_runtime_says_where_a_tensorrt_rtx_engine_runs():
    from persimmon_runtime.backends.tensorrt import check_engine_compatible, where_engine_runs

    section = engine_section(flavor="tensorrt-rtx", version="1.7.1.116", compute_capabilities=["8.6", "8.9", "12.0"],
                             version_compatible=False)
    assert where_engine_runs(section) == "TensorRT-RTX 1.7.1.116 on a GPU of compute capability 8.6, 8.9 or 12.0"
    check_engine_compatible(section, "1.7.1.116", "8.9")
    with pytest.raises(PersimmonError, match=r"this GPU has compute capability 9.0: rebuild it with .*"
                                             r"--backend tensorrt-rtx --compute-capabilities 9.0` if TensorRT-RTX "
                                             r"targets this GPU, else with `--backend tensorrt` here"):
        check_engine_compatible(section, "1.7.1.116", "9.0")  # an H100: not an RTX target
    with pytest.raises(PersimmonError, match=r"this machine has TensorRT-RTX 1.8.0: rebuild it here with "
                                             r"`persimmon-export build --backend tensorrt-rtx`$"):
        check_engine_compatible(section, "1.8.0", "8.9")  # no lean runtime: no --version-compatible advice


def test_tensorrt_backend_errors_are_clear_without_tensorrt(built, tmp_path):
    from persimmon_runtime.generator import Generator

    directory = built[1]["float16"]
    with pytest.raises(PersimmonError, match="this build has no TensorRT engine; rebuild it with"):
        Generator.load(directory, backend="tensorrt")
    assert Generator.load(directory).backend.name == "onnxruntime"  # auto falls back


@pytest.mark.skipif(TRT_VERSION is not None, reason="TensorRT is installed here")
def test_build_for_tensorrt_without_it_is_one_clear_error(built, tmp_path):
    with pytest.raises(PersimmonError, match="--backend tensorrt: tensorrt is not importable"):
        build(built[0], str(tmp_path / "trt"), BuildOptions(backend="tensorrt"))
    assert not (tmp_path / "trt").exists()


@pytest.mark.skipif(TRT_VERSION is not None, reason="NVIDIA TensorRT is installed here: auto builds with it")
def test_auto_never_picks_tensorrt_rtx(built, tmp_path, caplog):
    caplog.set_level(logging.INFO, "persimmon_export")
    manifest = build(built[0], str(tmp_path / "auto"), BuildOptions(max_batch=2, kv_capacity=64))
    assert manifest.tensorrt is None and manifest.onnx.cache_layout == "capacity"
    assert not (tmp_path / "auto" / "engine.plan").exists()
    if RTX_VERSION is not None:  # it is only pointed out
        assert "--backend tensorrt-rtx builds an engine" in caplog.text


def test_doctor_reports_every_item_with_reasons():
    from persimmon_export.doctor import report

    findings = dict(report())
    assert list(findings) == ["persimmon-deploy", "python", "torch", "onnx", "onnxruntime", "polygraphy",
                              "tensorrt", "tensorrt-rtx", "cuda-python", "gpu", "plugins", "plugin registry"]
    assert "CPUExecutionProvider" in findings["onnxruntime"]
    if TRT_VERSION is None:
        assert findings["tensorrt"].startswith("unavailable: ")
    if RTX_VERSION is None:
        assert findings["tensorrt-rtx"].startswith("unavailable: tensorrt_rtx is not importable")
    else:  # what TensorRT-RTX itself says, not what doctor computes
        import tensorrt_rtx

        finding = findings["tensorrt-rtx"]
        assert finding.startswith(f"{tensorrt_rtx.__version__} (supported; builds engines without a GPU for "
                                  f"compute capability ")
        listed = re.search(r"compute capability ([0-9., ]+) \(--backend tensorrt-rtx\)", finding).group(1)
        targets = listed.split(", ")
        assert all("SM" + t.replace(".", "") in tensorrt_rtx.ComputeCapability.__members__ for t in targets)
        assert {"8.6", "8.9", "12.0"} <= set(targets) and "7.5" not in targets  # Turing only when asked for
        assert ("no GPU here" in finding) == (GPU == "unknown")
    assert findings["plugins"].startswith("kernels compile with") or findings["plugins"].startswith("nvcc not found")
    if TRT_VERSION is not None:  # the real registry: what broke every plugin build once
        assert findings["plugin registry"].startswith("registered in TensorRT "), findings["plugin registry"]


# ---- TensorRT-RTX: real engines, built without a GPU ----

# Tiny models in the shapes that matter: QK-LayerNorm on and off, head_dim 24 (not a power of
# two), partial and full rotary, fp16 and fp32. The head_dim-24 checkpoint is written by
# transformers' save_pretrained (its own initialisation and layout), the others by our save_model.
SAVED_BY_TRANSFORMERS = {"head24-no-qkln-fp16"}
RTX_CONFIGS = {
    "qkln-fp16": ({}, "float16"),
    "head24-no-qkln-fp16": (dict(hidden_size=72, num_attention_heads=3, intermediate_size=160, qk_layernorm=False),
                            "float16"),
    "full-rotary-fp32": (dict(hidden_size=80, num_attention_heads=4, intermediate_size=192, num_hidden_layers=3,
                              partial_rotary_factor=1.0), "float32"),
}
RTX_BUILD = dict(max_batch=2, kv_capacity=64, engine=EngineOptions(max_prefill=16))


def save_pretrained_checkpoint(out_dir: str, seed: int, **config_fields) -> str:
    """The demo checkpoint's config and tokenizer, but the model is transformers' own
    PersimmonForCausalLM (its initialisation under `seed`) written by its save_pretrained."""
    import tempfile

    from persimmon_export.demo import train_tokenizer
    from persimmon_runtime import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Tokenizer(train_tokenizer(os.path.join(tmp, "tokenizer.model")))
        transformers_checkpoint(out_dir, tokenizer, seed=seed,
                                **{"vocab_size": -(-tokenizer.vocab_size // 64) * 64, **config_fields})
    return out_dir


@pytest.fixture(scope="module")
def rtx_builds(tmp_path_factory):
    if RTX_VERSION is None:
        pytest.skip(f"TensorRT-RTX is not installed: {RTX_MISSING}")
    root = tmp_path_factory.mktemp("rtx")
    out = {}
    for seed, (name, (fields, dtype)) in enumerate(RTX_CONFIGS.items()):
        write = save_pretrained_checkpoint if name in SAVED_BY_TRANSFORMERS else make_demo_checkpoint
        checkpoint = write(str(root / f"{name}-ckpt"), seed=seed, **fields)
        out[name] = (checkpoint, str(root / name))
        build(checkpoint, out[name][1], BuildOptions(dtype=dtype, backend="tensorrt-rtx", **RTX_BUILD))
    return out


@needs_rtx
def test_a_checkpoint_transformers_wrote_builds_an_engine(rtx_builds):
    """The network tests below run on it too: a layout only our own writer produces would not pass here."""
    import transformers

    [name] = SAVED_BY_TRANSFORMERS
    checkpoint, directory = rtx_builds[name]
    with open(os.path.join(checkpoint, "config.json")) as f:
        assert json.load(f)["transformers_version"] == transformers.__version__
    assert Manifest.load(directory).tensorrt.engine_file in os.listdir(directory)


@needs_rtx
def test_a_batch_of_one_builds(rtx_builds, tmp_path):
    """--max-batch 1: TensorRT-RTX 1.7's CPU builder killed the process (SIGSEGV) on profiles fixed
    at batch 1, so those span batch 1..2; the build completes (run in a child: a crash fails the test
    instead of the run) and its engine's profiles say so."""
    checkpoint, _ = rtx_builds["qkln-fp16"]
    out = str(tmp_path / "b1")
    code = ("import sys; from persimmon_export.build import build; from persimmon_export.options import BuildOptions; "
            "from persimmon_export.engine.tensorrt import EngineOptions; "
            "build(sys.argv[1], sys.argv[2], BuildOptions(backend='tensorrt-rtx', max_batch=1, kv_capacity=64, "
            "engine=EngineOptions(max_prefill=16)))")
    done = subprocess.run([sys.executable, "-c", code, checkpoint, out], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    manifest = Manifest.load(out)
    assert manifest.max_batch == 1
    assert all(profile.shapes["input_ids"][2][0] == 2 for profile in manifest.tensorrt.profiles)


def _layers(network):
    return [network.get_layer(i) for i in range(network.num_layers)]


def _tensors(network, count, get):
    return [(t.name, t.dtype, tuple(t.shape)) for t in (get(i) for i in range(count))]


def _expected_tensors(specs, trt):
    dtypes = {"int64": trt.int64, "float16": trt.float16, "float32": trt.float32}
    return [(s.name, dtypes[s.dtype], tuple(-1 if isinstance(d, str) else d for d in s.shape)) for s in specs]


@needs_rtx
@pytest.mark.parametrize("name", sorted(RTX_CONFIGS))
def test_rtx_network_is_strongly_typed_and_updates_each_cache_in_place(rtx_builds, name):
    import tensorrt_rtx as trt

    directory = rtx_builds[name][1]
    manifest = Manifest.load(directory)
    parsed = parse_onnx(TENSORRT_RTX, os.path.join(directory, manifest.tensorrt.onnx_file))
    network = parsed.network
    assert network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    layers = _layers(network)
    updates = [layer for layer in layers if layer.type == trt.LayerType.KV_CACHE_UPDATE]
    assert len(updates) == 2 * manifest.model.num_hidden_layers  # k and v per model layer
    # each writes into the cache input that manifest.cache_aliases pairs with its output
    pairs = {(layer.get_output(0).name, layer.get_input(0).name) for layer in updates}
    assert pairs == set(manifest.cache_aliases.items())
    assert not [layer.name for layer in layers if layer.type == trt.LayerType.SCATTER]  # no copying fallback
    assert _tensors(network, network.num_inputs, network.get_input) == _expected_tensors(manifest.onnx.inputs, trt)
    assert _tensors(network, network.num_outputs, network.get_output) == _expected_tensors(manifest.onnx.outputs, trt)


@needs_rtx
@pytest.mark.parametrize("name", sorted(RTX_CONFIGS))
def test_rtx_build_records_what_it_built(rtx_builds, name):
    import tensorrt_rtx as trt

    directory = rtx_builds[name][1]
    manifest = Manifest.load(directory, verify_checksums=True)
    section = manifest.tensorrt
    assert (section.flavor, section.version) == ("tensorrt-rtx", trt.__version__)
    assert section.compute_capabilities == choose_targets(TENSORRT_RTX, trt, None)
    assert "8.9" in section.compute_capabilities and "7.5" not in section.compute_capabilities
    assert (section.cache_update, section.plugin_ptx, section.version_compatible) == ("tensor_scatter", None, False)
    assert section.trtexec is None  # TensorRT-RTX's pip package has no trtexec
    # the profiles as TensorRT held them when building (read back from its profile objects), by role
    intended = optimization_profiles(manifest, RTX_BUILD["engine"].max_prefill)
    assert [profile.role for profile in section.profiles] == ["prefill", "decode"]
    assert [profile.shapes for profile in section.profiles] == \
        [{name: [list(s) for s in shapes] for name, shapes in p.items()} for p in intended]
    assert section.profiles[section.profile_index("decode")].shapes["input_ids"][2] == [RTX_BUILD["max_batch"], 1]
    engine = os.path.join(directory, section.engine_file)
    with open(engine, "rb") as f:
        data = f.read()
    assert len(data) > 100_000  # a serialized engine, not an empty or stub file
    assert manifest.files[section.engine_file] == FileEntry(len(data), hashlib.sha256(data).hexdigest())


@needs_rtx
def test_a_changed_rtx_engine_is_refused_at_load(rtx_builds, tmp_path):
    copy = tmp_path / "build"
    shutil.copytree(rtx_builds["qkln-fp16"][1], copy)
    with open(copy / "engine.plan", "r+b") as f:
        f.seek(50_000)
        byte = f.read(1)
        f.seek(50_000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(IntegrityError, match=r"engine\.plan: sha256"):
        Manifest.load(str(copy))


@needs_rtx
def test_the_recorded_polygraphy_line_rebuilds_the_engine(rtx_builds, tmp_path):
    """Engines are not byte-identical from build to build, but their size is; a profile or a
    target compute capability more or less changes it."""
    copy = tmp_path / "build"
    shutil.copytree(rtx_builds["head24-no-qkln-fp16"][1], copy)
    manifest = Manifest.load(str(copy))
    built = os.path.getsize(copy / "engine.plan")
    os.remove(copy / "engine.plan")
    command = shlex.split(manifest.tensorrt.polygraphy)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    targets = manifest.tensorrt.compute_capabilities
    assert f"Setting {len(targets)} target compute capabilities" in result.stdout + result.stderr
    assert os.path.getsize(copy / "engine.plan") == built


@needs_rtx
def test_the_scatter_elements_fallback_graph_builds(rtx_builds, tmp_path, terminal, caplog):
    import tensorrt_rtx as trt

    directory = rtx_builds["qkln-fp16"][1]
    manifest = Manifest.load(directory)
    fallback = scatter_elements_fallback(onnx.load(os.path.join(directory, "model.onnx"), load_external_data=False))
    path = tmp_path / "model.trt.onnx"
    onnx.save(fallback, str(path))
    shutil.copyfile(os.path.join(directory, "model.onnx.data"), tmp_path / "model.onnx.data")
    parsed = parse_onnx(TENSORRT_RTX, str(path))
    types = [layer.type for layer in _layers(parsed.network)]
    assert types.count(trt.LayerType.SCATTER) == 2 * manifest.model.num_hidden_layers
    assert trt.LayerType.KV_CACHE_UPDATE not in types
    config, _ = builder_config(trt, TENSORRT_RTX, parsed.builder, optimization_profiles(manifest, 16), ["8.9"])
    caplog.set_level(logging.INFO, "persimmon_export")
    shown = terminal()  # with the build's progress bars on it, as `persimmon-export build` shows them
    config.progress_monitor = monitor = build_monitor(trt, logging.getLogger("persimmon_export.engine.tensorrt"))
    engine = parsed.builder.build_serialized_network(parsed.network, config)
    assert engine is not None and engine.nbytes > 100_000
    assert monitor.bars == {} and "Building engine:" in shown()  # every phase finished; the top one was shown


def _break_tensor_scatter(real_export):
    """export_onnx, then set TensorScatter's mode to 'circular' (valid ONNX; TensorRT's parser
    supports only 'linear')."""
    def export(config, tensors, out_dir, **kwargs):
        result = real_export(config, tensors, out_dir, **kwargs)
        path = os.path.join(out_dir, "model.onnx")
        model = onnx.load(path, load_external_data=False)
        node = next(n for n in model.graph.node if n.op_type == "TensorScatter")
        node.attribute.append(helper.make_attribute("mode", "circular"))
        onnx.save(model, path)
        return result
    return export


@needs_rtx
def test_parser_errors_name_each_node_in_one_line_without_the_temp_directory(rtx_builds, tmp_path, monkeypatch):
    import persimmon_export.build as build_module

    monkeypatch.setattr(build_module, "export_onnx", _break_tensor_scatter(build_module.export_onnx))
    out = tmp_path / "out"
    with pytest.raises(EngineError) as error:
        build(rtx_builds["qkln-fp16"][0], str(out), BuildOptions(backend="tensorrt-rtx", **RTX_BUILD))
    message = str(error.value)
    assert message.startswith(f"{out}/model.onnx: the TensorRT-RTX {RTX_VERSION[0]}.")
    assert "ONNX parser rejects it: node " in message
    assert "(TensorScatter): " in message and "Only linear mode is supported" in message
    assert "\n" not in message and ".tmp-" not in message
    assert os.listdir(tmp_path) == []  # nothing left behind, temporary directory included


@needs_rtx
@pytest.mark.parametrize("options,refusal", [
    (dict(plugins="on"), "--plugins on: TensorRT-RTX has no Python-defined plugins"),
    (dict(version_compatible=True), "--version-compatible: TensorRT-RTX has no lean runtime"),
    (dict(timing_cache="timing.cache"), "--timing-cache: TensorRT-RTX ignores timing caches"),
    (dict(compute_capabilities=["7.5"]), r"--compute-capabilities 7.5: TensorRT-RTX 1.7.1 cannot build this model"),
    (dict(compute_capabilities=["9.0"]), r"--compute-capabilities '9.0': TensorRT-RTX .* builds for 8.0, 8.6"),
    (dict(compute_capabilities=["sm_86"]), r"--compute-capabilities 'sm_86'"),
    (dict(backend="tensorrt", compute_capabilities=["8.6"]),
     "is for --backend tensorrt-rtx|tensorrt is not importable"),
    (dict(backend="onnxruntime", compute_capabilities=["8.6"]), "is for --backend tensorrt-rtx"),
])
def test_what_tensorrt_rtx_cannot_do_is_refused_before_exporting(built, tmp_path, options, refusal):
    backend = options.pop("backend", "tensorrt-rtx")
    with pytest.raises(PersimmonError, match=refusal):
        build(built[0], str(tmp_path / "out"), BuildOptions(backend=backend, engine=EngineOptions(**options)))
    assert os.listdir(tmp_path) == []


@needs_rtx
def test_the_runtime_says_where_an_rtx_engine_runs_when_it_cannot_run_it(rtx_builds):
    from persimmon_runtime.generator import Generator

    directory = rtx_builds["qkln-fp16"][1]
    assert Generator.load(directory).backend.name == "onnxruntime"  # auto: no GPU it targets here
    code = f"""
import sys
class NoRTX:  # a serving host without TensorRT-RTX
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorrt_rtx", "tensorrt_rtx_libs", "tensorrt_rtx_bindings"):
            raise ImportError("blocked")
sys.meta_path.insert(0, NoRTX())
from persimmon_runtime.generator import Generator
Generator.load({directory!r}, backend="tensorrt")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "tensorrt_rtx is not installed: engine.plan runs on TensorRT-RTX " in result.stderr
    targets = Manifest.load(directory).tensorrt.compute_capabilities
    listed = f"{', '.join(targets[:-1])} or {targets[-1]}"
    assert f"on a GPU of compute capability {listed} (pip install tensorrt-rtx-cu12)" in result.stderr


@needs_rtx
def test_the_cli_says_a_refusal_in_one_line(built, tmp_path, capsys):
    from persimmon_export.cli import main

    status = main(["build", "--checkpoint", built[0], "--out", str(tmp_path / "out"), "--backend", "tensorrt-rtx",
                   "--compute-capabilities", "8.6", "9.0"])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.startswith("persimmon-export build: error: --compute-capabilities '9.0': TensorRT-RTX ")
    assert captured.err.count("\n") == 1 and "builds for 8.0, 8.6, 8.9, 12.0" in captured.err
    assert os.listdir(tmp_path) == []


@needs_rtx
@pytest.mark.parametrize("field,value,complaint", [
    ("flavor", "tensorrt-llm", "field tensorrt.flavor must be 'tensorrt' or 'tensorrt-rtx'"),
    ("compute_capabilities", ["sm_86"], r"field tensorrt.compute_capabilities\[0\] must be a compute capability"),
    ("compute_capabilities", "8.6", "field tensorrt.compute_capabilities must be a list"),
    ("compute_capabilities", ["\u0668.\u0666"], r"field tensorrt.compute_capabilities\[0\] must be"),  # Arabic digits
])
def test_manifest_engine_fields_are_validated(rtx_builds, tmp_path, field, value, complaint):
    copy = tmp_path / "build"
    shutil.copytree(rtx_builds["qkln-fp16"][1], copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["tensorrt"][field] = value
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=complaint):
        Manifest.load(str(copy))


# ---- on a GPU: engines against the torch reference and onnxruntime ----

@pytest.mark.gpu
@pytest.mark.skipif(TRT_VERSION is None, reason=f"NVIDIA TensorRT is not available here: {TRT_MISSING}")
@pytest.mark.skipif(GPU == "unknown", reason="no GPU visible through cuda-python")
def test_tiny_engine_matches_torch_and_onnxruntime(built, tmp_path):
    _check_engine_parity(built[0], str(tmp_path / "trt"), "tensorrt")


# Not marked `gpu`: TensorRT-RTX engines run on RTX-class GPUs only (not on the H100/H200 GPU
# machines of examples/gpu_tests.sh, where a skipped `gpu` test counts as a failure).
@needs_rtx
@pytest.mark.skipif(GPU == "unknown" or GPU not in ("8.0", "8.6", "8.9", "12.0", "12.1"),
                    reason=f"needs a GPU TensorRT-RTX targets (this machine: {GPU})")
def test_tiny_rtx_engine_matches_torch_and_onnxruntime(built, tmp_path):
    _check_engine_parity(built[0], str(tmp_path / "rtx"), "tensorrt-rtx")


def _check_engine_parity(checkpoint, out, backend):
    from persimmon_export.validate.parity import check_parity

    build(checkpoint, out, BuildOptions(dtype="float16", max_batch=4, kv_capacity=64, backend=backend,
                                        engine=EngineOptions(max_prefill=32)))
    results = check_parity(checkpoint, out, decode_steps=16, backends=("tensorrt", "onnxruntime"), device="cuda")
    assert all(r.passed for r in results), [r.line() for r in results]


def test_a_bfloat16_build_refuses_plugins_on_and_auto_leaves_them_out(monkeypatch):
    """The plugin kernels are float16/float32: a bf16 build with them failed inside the builder
    ("no kernel for 7"). NVIDIA TensorRT is a stand-in module here (only what the check reads)."""
    import dataclasses
    import sys
    import types

    from persimmon_export.engine.tensorrt import TENSORRT, EngineError, _use_plugins, check_engine_options

    monkeypatch.setitem(sys.modules, "stand_in_tensorrt", types.SimpleNamespace(__version__="10.15.1.29",
                                                                              Builder=object))
    flavor = dataclasses.replace(TENSORRT, module="stand_in_tensorrt")
    with pytest.raises(EngineError, match=r"--plugins on: the plugin kernels are float16 and float32 only, this "
                                          r"build is bfloat16; use --plugins off or auto"):
        check_engine_options(flavor, EngineOptions(plugins="on"), "bfloat16")
    assert check_engine_options(flavor, EngineOptions(plugins="on"), "float16")[0] == (10, 15, 1, 29)
    assert _use_plugins(flavor, "auto", "bfloat16") is False


@pytest.mark.parametrize("where", ["a directory", "an unwritable place"])
def test_a_bad_timing_cache_is_refused_before_the_export(monkeypatch, tmp_path, where):
    import dataclasses
    import sys
    import types

    from persimmon_export.engine.tensorrt import TENSORRT, EngineError, check_engine_options

    monkeypatch.setitem(sys.modules, "stand_in_tensorrt", types.SimpleNamespace(__version__="10.15.1.29",
                                                                              Builder=object))
    flavor = dataclasses.replace(TENSORRT, module="stand_in_tensorrt")
    path = str(tmp_path) if where == "a directory" else str(tmp_path / "missing-dir" / "timing.cache")
    with pytest.raises(EngineError, match=re.escape(f"--timing-cache {path}: ")):
        check_engine_options(flavor, EngineOptions(plugins="off", timing_cache=path))
    # a new file in a writable place
    check_engine_options(flavor, EngineOptions(plugins="off", timing_cache=str(tmp_path / "new.cache")))
