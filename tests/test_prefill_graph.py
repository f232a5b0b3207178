"""The int8 prefill graph (`build --prefill int8`, issue 24): prompt steps of at least min_tokens
new tokens per row multiply int8 weights by per-token int8 activations (DynamicQuantizeMatMul), on
CPUs with AMX-INT8 / VNNI by default. Checked against transformers fp32: the prompt's logits and
the decode steps after it (which read the cache the int8 step wrote) stay within the int8 parity
bounds, shorter steps run the build's own graph unchanged, and the choice is what the CPU's flags
and the caller say. The int8 products are exact on every x86 CPU: VNNI/AMX add in 32 bits, and
without them the session asks onnxruntime for its u8 x u8 kernels (session.x64quantprecision)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from conftest import error_line, transformers_checkpoint

from persimmon_export.build import build
from persimmon_export.graph.quantize import PREFILL_MIN_TOKENS
from persimmon_export.options import BuildOptions
from persimmon_export.validate.bounds import BOUNDS, INT8_MAX_ABS, INT8_TOP1, PREFILL_INT8
from persimmon_export.validate.parity import check_parity
from persimmon_runtime import PersimmonError, Tokenizer, cpu
from persimmon_runtime.backends import decode, prefill
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import Manifest, ManifestError

DECODE_STEPS = 8
PROMPT = ("human: The quick brown fox jumps over the lazy dog, and then it runs far away into the "
          "forest where nobody can find it.\n\nadept:")


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, tiny_checkpoint):
    out = str(tmp_path_factory.mktemp("hf") / "ckpt")
    transformers_checkpoint(out, Tokenizer.from_dir(tiny_checkpoint), seed=3)
    return out


@pytest.fixture(scope="module", params=["float32", "float16"])
def prefill_build(request, hf_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"prefill-{request.param}") / "build")
    build(hf_checkpoint, out, BuildOptions(dtype=request.param, prefill="int8", backend="onnxruntime", max_batch=2,
                                           kv_capacity=96))
    return out


def reference_logits(checkpoint: str, ids: list[int]) -> np.ndarray:
    """transformers fp32: the logits at every position of `ids`."""
    hf = transformers.PersimmonForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def backend_logits(build_dir: str, setting: str, prompt: list[int], following: list[int]):
    """The backend's logits after `prompt` (one step) and after each of `following` (decode steps),
    [1 + len(following), vocab], and its prefill_kernels."""
    backend = Generator.load(build_dir, prefill=setting).backend
    logits, positions = prefill(backend, [prompt])
    rows = [logits[0]]
    for token in following:
        rows.append(decode(backend, np.array([token]), positions)[0])
    return np.stack(rows), backend.prefill_kernels


def test_int8_prompt_step_is_within_the_int8_bounds_of_transformers(prefill_build, hf_checkpoint):
    ids = Tokenizer.from_dir(hf_checkpoint).encode(PROMPT)
    assert len(ids) >= PREFILL_MIN_TOKENS + DECODE_STEPS
    prompt, following = ids[:-DECODE_STEPS], ids[-DECODE_STEPS:]
    reference = reference_logits(hf_checkpoint, ids)[len(prompt) - 1:]  # after the prompt, then after each token
    scale = np.abs(reference).max()
    exact, off_kernels = backend_logits(prefill_build, "off", prompt, following)
    int8, kernels = backend_logits(prefill_build, "int8", prompt, following)
    assert off_kernels == "off (as asked)" and kernels.startswith("int8 DynamicQuantizeMatMul")
    dtype = Manifest.load(prefill_build).dtype
    off_bound = 1e-4 if dtype == "float32" else BOUNDS["float16"]["max_abs"]
    assert np.abs(exact - reference).max() <= off_bound * scale  # the build's own graph: as before
    error = np.abs(int8 - reference).max(axis=-1) / scale
    top1 = (int8.argmax(-1) == reference.argmax(-1)).mean()
    message = f"{dtype}: max|dlogit| / max|logit| prompt {error[0]:.2%}, decode {error[1:].max():.2%}; top-1 {top1:.0%}"
    print(message)
    assert error.max() <= INT8_MAX_ABS and top1 >= INT8_TOP1, message
    assert np.abs(int8[0] - exact[0]).max() > 1e-6 * scale, "the prompt step did not run the int8 graph"


def test_steps_below_min_tokens_run_the_builds_own_graph(prefill_build, hf_checkpoint):
    ids = Tokenizer.from_dir(hf_checkpoint).encode(PROMPT)[:PREFILL_MIN_TOKENS - 1]
    exact, _ = backend_logits(prefill_build, "off", ids, ids[:2])
    int8, _ = backend_logits(prefill_build, "int8", ids, ids[:2])
    np.testing.assert_array_equal(int8, exact)


def test_parity_of_a_float_build_uses_the_int8_bounds_when_its_prefill_graph_ran(prefill_build, hf_checkpoint):
    [result] = check_parity(hf_checkpoint, prefill_build, prompts=[PROMPT], decode_steps=8)
    uses_graph = cpu.int8_unit(cpu.cpu_flags()) is not None  # prefill 'auto'
    dtype = Manifest.load(prefill_build).dtype
    assert result.dtype == (f"{dtype}/{PREFILL_INT8}" if uses_graph else dtype)
    assert result.passed, result.line()


def test_without_a_vnni_unit_forced_int8_uses_onnxruntimes_exact_u8u8_kernels(prefill_build, hf_checkpoint,
                                                                             monkeypatch):
    """An AVX2-only CPU: 'auto' leaves the prefill graph alone; 'int8' runs it with
    session.x64quantprecision, under which onnxruntime rewrites the int8 weights to uint8
    (its u8 x s8 AVX2 kernels add pairs of products in saturating 16 bits)."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda path=cpu.CPUINFO: {"avx", "avx2", "fma"})
    assert Generator.load(prefill_build).backend.prefill_session is None
    backend = Generator.load(prefill_build, prefill="int8").backend
    assert backend.prefill_kernels == "int8 DynamicQuantizeMatMul, u8 x u8 (no VNNI/AMX; forced)"
    options = backend.prefill_session.get_session_options()
    assert options.get_session_config_entry("session.x64quantprecision") == "1"
    ids = Tokenizer.from_dir(hf_checkpoint).encode(PROMPT)
    reference = reference_logits(hf_checkpoint, ids)[-1]
    logits, _ = prefill(backend, [ids])
    assert np.abs(logits[0] - reference).max() <= INT8_MAX_ABS * np.abs(reference).max()
    monkeypatch.undo()
    if cpu.int8_unit(cpu.cpu_flags()) is not None:  # the same integer products as the VNNI/AMX kernels
        vnni, _ = prefill(Generator.load(prefill_build, prefill="int8").backend, [ids])
        np.testing.assert_allclose(logits, vnni, rtol=0, atol=1e-5 * np.abs(reference).max())


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16
"""


def test_cpu_flags_and_model_are_read_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    flags = cpu.cpu_flags(str(path))
    assert {"avx2", "avx512_vnni", "avx512_bf16"} <= flags and cpu.int8_unit(flags) == "avx512_vnni"
    assert cpu.cpu_model(str(path)) == "AMD EPYC 9R14"
    assert cpu.cpu_flags(str(tmp_path / "missing")) == set()
    if os.path.exists(cpu.CPUINFO):  # this machine's own
        assert cpu.cpu_flags() and cpu.cpu_model()


@pytest.mark.parametrize("flags, unit", [({"amx_int8", "avx512_vnni", "avx_vnni"}, "amx_int8"),
                                         ({"avx512_vnni", "avx2"}, "avx512_vnni"), ({"avx_vnni", "avx2"}, "avx_vnni"),
                                         ({"avx2", "fma"}, None), (set(), None)])
def test_auto_uses_the_prefill_graph_only_on_an_integer_matrix_unit(flags, unit):
    use, chosen, kernels = cpu.choose_prefill("auto", True, "cpu", flags)
    assert (use, chosen) == (unit is not None, unit)
    assert kernels == (f"int8 DynamicQuantizeMatMul on {unit}" if unit else
                       "off (the CPU has no AMX-INT8, AVX512-VNNI or AVX-VNNI)")
    assert cpu.choose_prefill("off", True, "cpu", flags)[0] is False
    assert cpu.choose_prefill("auto", False, "cpu", flags) == (False, None, "off (this build has no prefill graph)")
    assert cpu.choose_prefill("auto", True, "cuda", flags)[0] is False


@pytest.mark.parametrize("choice, has_graph, device, message", [
    ("int8", False, "cpu", r"this build has no prefill graph; rebuild it with `persimmon-export build --prefill int8`"),
    ("int8", True, "cuda", r"prefill 'int8' is for CPUs"),
    ("fast", True, "cpu", r"prefill 'fast' is not one of \('auto', 'int8', 'off'\)"),
])
def test_impossible_prefill_choices_are_one_line_errors(choice, has_graph, device, message):
    with pytest.raises(PersimmonError, match=message) as error:
        cpu.choose_prefill(choice, has_graph, device, {"avx512_vnni"})
    assert "\n" not in str(error.value)


def test_build_defaults_int8_prefill_for_quantized_builds_only(tiny_checkpoint, tmp_path):
    options = dict(backend="onnxruntime", max_batch=1, kv_capacity=64)
    cases = {"fp32": ({}, None), "int4": ({"weights": "int4"}, "int8"),
             "int8-none": ({"weights": "int8", "prefill": "none"}, None), "fp32-int8": ({"prefill": "int8"}, "int8")}
    for name, (extra, expected) in cases.items():
        manifest = build(tiny_checkpoint, str(tmp_path / name), BuildOptions(dtype="float32", **options, **extra))
        assert (manifest.prefill and manifest.prefill.weights) == expected, name
        has_files = {"prefill.onnx", "prefill.onnx.data"} <= set(manifest.files)
        assert has_files == (expected is not None) == os.path.exists(tmp_path / name / "prefill.onnx")
    section = Manifest.load(str(tmp_path / "fp32-int8")).prefill
    assert section.op == "DynamicQuantizeMatMul" and section.min_tokens == PREFILL_MIN_TOKENS
    assert section.tensors == ["query_key_value.weight", "dense.weight", "dense_h_to_4h.weight",
                               "dense_4h_to_h.weight", "lm_head.weight"]


@pytest.mark.parametrize("options, message", [
    (dict(prefill="int4"), r"--prefill 'int4' is not one of \('int8', 'none'\)"),
    (dict(prefill="int8", cache_layout="whole"), r"--prefill int8 adds a graph for onnxruntime's causal-LM step with "
                                                 r"cache layout 'capacity'; this build has cache layout 'whole'"),
    (dict(prefill="int8", backend="tensorrt-rtx", dtype="float16"), r"this build has a TensorRT engine"),
])
def test_bad_prefill_options_are_one_line_errors_before_any_output(options, message, tiny_checkpoint, tmp_path):
    options = {"backend": "onnxruntime", "dtype": "float32", **options}
    with pytest.raises(PersimmonError, match=message) as error:
        build(tiny_checkpoint, str(tmp_path / "out"), BuildOptions(max_batch=1, kv_capacity=64, **options))
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw["files"].pop("prefill.onnx"), r"prefill.file is 'prefill.onnx', which `files` does not list"),
    (lambda raw: raw["prefill"].update(min_tokens=0), r"field prefill.min_tokens"),
    (lambda raw: raw["prefill"].update(op="MatMulInteger"), r"field prefill.op"),
    (lambda raw: raw["prefill"].update(file="../model.onnx"), r"field prefill.file"),
    (lambda raw: raw["onnx"].update(cache_layout="whole"), r"a prefill graph belongs to a causal-lm build with cache "
                                                           r"layout 'capacity'"),
])
def test_a_tampered_prefill_section_is_refused(edit, message, prefill_build, tmp_path):
    raw = json.load(open(os.path.join(prefill_build, "manifest.json")))
    edit(raw)
    copy = tmp_path / "b"
    copy.mkdir()
    for name in os.listdir(prefill_build):
        if name != "manifest.json":
            os.link(os.path.join(prefill_build, name), copy / name)
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message):
        Manifest.load(str(copy), verify_checksums=False)


def test_persimmon_run_refuses_int8_prefill_for_a_build_without_the_graph(tiny_build):
    exe = os.path.join(os.path.dirname(sys.executable), "persimmon-run")
    result = subprocess.run([exe, tiny_build, "hello", "--prefill", "int8"], capture_output=True, text=True)
    assert result.returncode == 2
    assert error_line(result.stderr) == (
        "persimmon-run: error: prefill 'int8': this build has no prefill graph; rebuild it with `persimmon-export "
        "build --prefill int8`, or use prefill 'auto'")


def test_a_build_without_the_graph_has_no_prefill_key_and_triton_refuses_int8(tiny_build, tmp_path):
    """Absent rather than null: a runtime from before the section still reads such a build."""
    from persimmon_export.deploy.triton import write_repository

    assert "prefill" not in json.load(open(os.path.join(tiny_build, "manifest.json")))
    with pytest.raises(PersimmonError, match=r"--prefill int8: .* has no prefill graph; rebuild it") as error:
        write_repository(tiny_build, str(tmp_path / "repo"), prefill="int8")
    assert "\n" not in str(error.value) and not (tmp_path / "repo").exists()


def test_both_backends_satisfy_the_backend_protocol(tiny_build):
    """The onnxruntime backend as loaded; the TensorRT one by its class (it needs a GPU to load):
    every member of `Backend`, methods with the protocol's parameters."""
    import inspect

    from persimmon_runtime.backends import Backend
    from persimmon_runtime.backends.tensorrt import TensorRTBackend

    assert isinstance(Generator.load(tiny_build).backend, Backend)
    members = {"manifest", "name", "prefill_kernels", "max_step_tokens", "start", "step"}
    assert members == set(Backend.__annotations__) | {name for name in vars(Backend) if not name.startswith("_")}
    instance_attributes = inspect.getsource(TensorRTBackend.__init__)
    for member in members:
        assert hasattr(TensorRTBackend, member) or f"self.{member} =" in instance_attributes, member
    for method in ("start", "step"):
        expected = list(inspect.signature(getattr(Backend, method)).parameters)
        assert list(inspect.signature(getattr(TensorRTBackend, method)).parameters) == expected, method
    assert isinstance(TensorRTBackend.max_step_tokens, property)
