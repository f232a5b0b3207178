"""Builds load on the onnxruntime users have, not only on the newest.

examples/setup.sh makes two runtime-only venvs (no torch): `.cache/venv-floors` holds exactly the
floors pyproject.toml declares for onnxruntime, numpy and sentencepiece, and
`.cache/venv-ort-gpu-newest` the onnxruntime version of the newest onnxruntime-gpu (its CPU
wheel: onnxruntime-gpu and Triton containers lag the CPU package). Each runs this checkout's
runtime on the same builds as this venv's newest onnxruntime and must give the same greedy tokens
and classifier logits (a float build's int8 prefill graph included: forced, on a prompt wide enough
to run it). The exporter declares the lowest opset and IR version each graph needs
(persimmon_export.graph.onnx_versions); one opset lower must fail onnx.checker.
"""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime
import pytest
import transformers
from conftest import error_line, transformers_checkpoint

from persimmon_export.build import build
from persimmon_export.options import BuildOptions
from persimmon_runtime.classifier import Classifier
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import Manifest
from persimmon_runtime.tokenizer import Tokenizer
from persimmon_runtime.verify import sha256_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENVS = {"floors": os.path.join(ROOT, ".cache", "venv-floors"),
         "ort-gpu-newest": os.path.join(ROOT, ".cache", "venv-ort-gpu-newest")}
PROMPTS = ["Hello world", "The capital of France is", "東京 🎉 and more"]
TEXTS = ["I loved it.", "no", "The quick brown fox jumps over the lazy dog."]
CAUSAL_BUILDS = {"float32": dict(dtype="float32"), "float16": dict(dtype="float16"),
                 "int8": dict(dtype="float32", weights="int8"), "int4": dict(dtype="float16", weights="int4"),
                 "prefill": dict(dtype="float32", prefill="int8")}
# the builds whose int8 prefill graph runs (forced: whatever the CPU), on a prompt wide enough for it
FORCED_PREFILL = {"prefill": "int8"}
LONG_PROMPTS = [" ".join(PROMPTS)]

# Run in the other venv with this checkout's runtime on its path: greedy tokens per causal build,
# logits per classifier build, and the versions it ran with.
PROBE = """
import json, sys
import numpy, onnxruntime, sentencepiece
from persimmon_runtime.classifier import Classifier
from persimmon_runtime.generator import Generator
job = json.loads(sys.argv[1])
out = {"versions": {"onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
                    "sentencepiece": sentencepiece.__version__}, "tokens": {}, "logits": {},
       "prefill_steps": {}}
for name, path in job["causal"].items():
    prefill = job["prefill"].get(name, "auto")
    prompts = job["prompts"] if prefill == "auto" else job["long_prompts"]
    generator = Generator.load(path, prefill=prefill)
    completions = generator.generate(prompts, max_new_tokens=12, ignore_eos=True)
    out["tokens"][name] = [c.token_ids for c in completions]
    out["prefill_steps"][name] = generator.backend.prefill_steps
for name, (path, ids) in job["classifiers"].items():
    out["logits"][name] = [row.tolist() for row in Classifier.load(path).logits(ids)]
try:
    import torch
    out["torch"] = True
except ImportError:
    out["torch"] = False
print(json.dumps(out))
"""


def run_in_venv(venv: str, code: str, *args: str) -> subprocess.CompletedProcess:
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(python):
        pytest.skip(f"{venv} is missing: examples/setup.sh makes it")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "runtime")}
    return subprocess.run([python, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)


def declared_floor(package: str) -> str:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(rf'"{package}>=([0-9.]+)"', f.read()).group(1)


@pytest.fixture(scope="module")
def builds(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    causal = {}
    for name, options in CAUSAL_BUILDS.items():
        causal[name] = str(root / name)
        build(tiny_checkpoint, causal[name], BuildOptions(max_batch=4, kv_capacity=64, backend="onnxruntime",
                                                          **options))
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    checkpoint = str(root / "classifier-checkpoint")
    transformers_checkpoint(checkpoint, tokenizer, transformers.PersimmonForSequenceClassification,
                            pad_token_id=0, id2label={0: "no", 1: "yes"})
    classifier = str(root / "classifier")
    build(checkpoint, classifier, BuildOptions(dtype="float32", max_batch=2, max_text_tokens=64, backend="onnxruntime"))
    window = str(root / "window")  # the layout TensorRT engines are built from (opset 24)
    build(tiny_checkpoint, window, BuildOptions(dtype="float32", max_batch=2, kv_capacity=64, backend="onnxruntime",
                                                cache_layout="window"))
    ids = [tokenizer.encode(text) for text in TEXTS]
    return {"causal": causal, "classifiers": {"sequence": (classifier, ids)}, "window": window}


def reference(builds) -> dict:
    """What this venv's (newest) onnxruntime gives on the same builds."""
    tokens = {}
    for name, path in builds["causal"].items():
        prefill = FORCED_PREFILL.get(name, "auto")
        generator = Generator.load(path, prefill=prefill)
        prompts = PROMPTS if prefill == "auto" else LONG_PROMPTS
        tokens[name] = [c.token_ids for c in generator.generate(prompts, max_new_tokens=12, ignore_eos=True)]
    logits = {name: [row.tolist() for row in Classifier.load(path).logits(ids)]
              for name, (path, ids) in builds["classifiers"].items()}
    return {"tokens": tokens, "logits": logits}


@pytest.mark.parametrize("venv", VENVS)
def test_builds_run_alike_on_older_onnxruntimes(builds, venv):
    job = {"causal": builds["causal"], "classifiers": builds["classifiers"], "prompts": PROMPTS,
           "prefill": FORCED_PREFILL, "long_prompts": LONG_PROMPTS}
    probe = run_in_venv(VENVS[venv], PROBE, json.dumps(job))
    assert probe.returncode == 0, probe.stderr[-3000:]
    got, expected = json.loads(probe.stdout), reference(builds)
    assert got["torch"] is False  # a serving host's stack: the runtime alone
    if venv == "floors":  # exactly what pyproject.toml declares, so the floors are the ones tested
        assert got["versions"] == {p: declared_floor(p) + ".0" * (2 - declared_floor(p).count("."))
                                   for p in ("onnxruntime", "numpy", "sentencepiece")}
    assert got["versions"]["onnxruntime"] != onnxruntime.__version__
    assert got["tokens"] == expected["tokens"]
    assert all(got["prefill_steps"][name] > 0 for name in FORCED_PREFILL)  # the int8 graph ran there too
    for name, rows in expected["logits"].items():
        for row, want in zip(got["logits"][name], rows):
            np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-5)


def test_a_build_the_onnxruntime_cannot_read_is_one_line(builds, tmp_path):
    """The window layout (opset 24, IR 12) is beyond onnxruntime 1.23; a build from before the
    versions were declared (IR 14, nothing in the manifest) is beyond every onnxruntime but 1.32."""
    refused = run_in_venv(VENVS["floors"], "import sys; from persimmon_runtime.cli import main; sys.exit(main())",
                          builds["window"], "hi", "--max-new-tokens", "2")
    assert refused.returncode == 2 and refused.stdout == ""
    line = error_line(refused.stderr)
    assert f"{builds['window']}/model.onnx: onnxruntime {declared_floor('onnxruntime')}" in line
    assert "(IR 12, opsets ai.onnx 24, persimmon 1)" in line and "docs/compatibility.md" in line
    assert "Unsupported model IR version: 12" in line

    old = str(tmp_path / "old")
    shutil.copytree(builds["causal"]["float32"], old)
    model_path = os.path.join(old, "model.onnx")
    model = onnx.load(model_path, load_external_data=False)
    model.ir_version = 14  # what onnx 1.23 writes by default
    onnx.save(model, model_path)
    with open(os.path.join(old, "manifest.json")) as f:
        manifest = json.load(f)
    del manifest["onnx"]["ir_version"], manifest["onnx"]["opset_imports"]
    manifest["files"]["model.onnx"] = {"bytes": os.path.getsize(model_path), "sha256": sha256_file(model_path)}
    with open(os.path.join(old, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    refused = run_in_venv(VENVS["ort-gpu-newest"], "import sys; from persimmon_runtime.cli import main; "
                          "sys.exit(main())", old, "hi", "--max-new-tokens", "2")
    line = error_line(refused.stderr)
    assert refused.returncode == 2 and "Unsupported model IR version: 14" in line
    assert "not recorded" in line and "rebuild it with this persimmon-export" in line


def lower_standard_opset(model: onnx.ModelProto, opset: int) -> None:
    for imports in [model.opset_import, *(f.opset_import for f in model.functions)]:
        for entry in imports:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset


@pytest.mark.parametrize("which", ["float32", "int4", "classifier", "window"])
def test_each_graph_declares_the_lowest_opset_and_ir_it_needs(builds, which, tmp_path):
    path = {"classifier": builds["classifiers"]["sequence"][0], "window": builds["window"]}.get(which) or \
        builds["causal"][which]
    manifest = Manifest.load(path)
    model = onnx.load(os.path.join(path, "model.onnx"), load_external_data=False)
    declared = manifest.onnx.opset_imports["ai.onnx"]
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import} == manifest.onnx.opset_imports
    assert model.ir_version == manifest.onnx.ir_version == onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", declared)])
    assert declared == (24 if which == "window" else 17)
    assert all(o.version == declared for f in model.functions for o in f.opset_import if o.domain == "")
    shutil.copy(os.path.join(path, "model.onnx.data"), tmp_path)  # the checker reads the weights beside it
    for opset, valid in ((declared, True), (declared - 1, False)):  # the declared opset is enough, one lower not
        lower_standard_opset(model, opset)
        onnx.save(model, tmp_path / "model.onnx")
        if valid:
            onnx.checker.check_model(tmp_path / "model.onnx", full_check=True)
        else:
            with pytest.raises(onnx.checker.ValidationError, match="No Op registered for (LayerNorm|TensorScatter)"):
                onnx.checker.check_model(tmp_path / "model.onnx", full_check=True)


@pytest.mark.parametrize("weights", [None, "int8", "int4"])
def test_the_tensorrt_fallback_graph_declares_what_its_ops_need(tiny_checkpoint, tmp_path, weights):
    """model.trt.onnx (TensorRT < 10.15: TensorScatter rewritten as ScatterElements) drops to the
    lowest opset its remaining ops need; with TensorRT's int8/int4 weights that is DequantizeLinear's
    (float16 scales: opset 19; int4, blocked: block_size and int4, opset 21 and IR 10), not 17."""
    from persimmon_export.config import PersimmonConfig
    from persimmon_export.engine.tensorrt import scatter_elements_fallback
    from persimmon_export.graph.export import export_onnx
    from persimmon_export.graph.quantize import weight_format
    from persimmon_export.load.checkpoint import checked_tensors

    config = PersimmonConfig.from_file(tiny_checkpoint)
    quantized = weight_format(weights, None, config, engine=True) if weights else None
    export_onnx(config, checked_tensors(tiny_checkpoint, config), str(tmp_path), dtype="float16", kv_capacity=64,
                cache_layout="window", weights=quantized)
    model = scatter_elements_fallback(onnx.load(tmp_path / "model.onnx", load_external_data=False))
    declared = {None: 17, "int8": 19, "int4": 21}[weights]
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == declared
    assert model.ir_version == onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", declared)])
    for opset, valid in ((declared, True), (declared - 1, False)):
        lower_standard_opset(model, opset)
        onnx.save(model, tmp_path / "model.trt.onnx")  # beside model.onnx.data
        if valid:
            onnx.checker.check_model(tmp_path / "model.trt.onnx", full_check=True)
        else:
            with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
                onnx.checker.check_model(tmp_path / "model.trt.onnx", full_check=True)
