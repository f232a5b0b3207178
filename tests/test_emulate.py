"""True-fp16 emulation of a build's step graph: agrees with fp32 where fp16 holds, and shows the
overflow that onnxruntime's CPU provider hides (it computes an fp16 graph in fp32)."""

import os
import shutil

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

from persimmon_export.build import build
from persimmon_export.graph.export import ExportError
from persimmon_export.options import BuildOptions
from persimmon_export.validate.emulate import EmulatedBackend, emulated_step
from persimmon_export.validate.parity import check_parity
from persimmon_runtime import PersimmonError, Tokenizer
from persimmon_runtime.backends import decode, prefill
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import FileEntry, Manifest
from persimmon_runtime.verify import sha256_file

PROMPTS = ["human: What is the capital of France?\n\nadept:", "The quick brown"]
# fp16 against fp32: the bound `persimmon-export parity` applies to fp16 builds, 2% of the largest
# |logit|. Each stored fp16 tensor carries a relative error up to 2^-11 (0.05%); the tiny model's
# path to a logit goes through ~20 such roundings per layer, and LayerNorm rescales the error with
# its input, so 2% leaves the margin of a few dozen roundings adding up in one direction.
# Observed: 6.2e-3 on logits up to 3.7 (0.17%).
FP16_BOUND = 0.02
MLP_UNIT_LAYER = 0


def prompt_ids(checkpoint):
    tokenizer = Tokenizer.from_dir(checkpoint)
    return [tokenizer.encode(p) for p in PROMPTS]


def onnxruntime_prefill(build_dir, prompts):
    return prefill(Generator.load(build_dir, backend="onnxruntime").backend, prompts)


@pytest.fixture(scope="module")
def fp16_build(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint's fp16 onnxruntime build, shaped like conftest's fp32 `tiny_build`."""
    out = str(tmp_path_factory.mktemp("emulate") / "fp16")
    build(tiny_checkpoint, out, BuildOptions(dtype="float16", max_batch=2, kv_capacity=96, backend="onnxruntime"))
    return out


def test_emulated_fp16_agrees_with_onnxruntime_fp32_where_nothing_overflows(tiny_checkpoint, tiny_build, fp16_build):
    prompts = prompt_ids(tiny_checkpoint)
    assert len(prompts[0]) != len(prompts[1])  # right padding and token_count are exercised
    fp32 = Generator.load(tiny_build, backend="onnxruntime").backend
    emulated = EmulatedBackend(fp16_build)
    expected, positions = prefill(fp32, prompts)
    got, _ = prefill(emulated, prompts)
    steps = [(got, expected)]
    for _ in range(4):  # decode steps on the emulated caches, fed the fp32 tokens (teacher forcing)
        tokens = expected.argmax(-1)
        got = decode(emulated, tokens, positions.copy())
        expected = decode(fp32, tokens, positions)
        steps.append((got, expected))
    for got, expected in steps:
        assert got.dtype == np.float32 and np.isfinite(got).all()
        bound = FP16_BOUND * np.abs(expected).max()
        assert np.abs(got - expected).max() <= bound
        assert (got.argmax(-1) == expected.argmax(-1)).all()
    # the emulation does not compute what onnxruntime's CPU provider computes from the same graph
    cpu_fp16, _ = onnxruntime_prefill(fp16_build, prompts)
    assert not np.array_equal(prefill(EmulatedBackend(fp16_build), prompts)[0], cpu_fp16)


def test_emulated_step_is_one_step_over_fresh_caches(tiny_checkpoint, fp16_build):
    ids = np.array([prompt_ids(tiny_checkpoint)[1]], np.int64)
    logits = emulated_step(fp16_build, ids, np.zeros(1, np.int64), np.array([ids.shape[1]]),
                           np.ones_like(ids))
    backend = EmulatedBackend(fp16_build)
    assert np.array_equal(logits, prefill(backend, [ids[0].tolist()])[0])
    with pytest.raises(PersimmonError, match=r"first_slot 90 \+ 11 new tokens exceeds the KV cache capacity 96"):
        emulated_step(fp16_build, ids, np.array([90]), np.array([ids.shape[1]]), np.ones((1, 96), np.int64))
    with pytest.raises(PersimmonError, match=r"input_ids must be a 2-D numpy array .* got list of shape \(3,\)"):
        emulated_step(fp16_build, [1, 2, 3], np.zeros(1, np.int64), np.array([3]), np.ones((1, 3), np.int64))


def mlp_preactivations(checkpoint, prompts):
    """transformers' fp32 layer-0 MLP pre-activations (dense_h_to_4h output) on each prompt, [tokens, units]."""
    model = transformers.PersimmonForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    seen = []
    layer = model.model.layers[MLP_UNIT_LAYER].mlp.dense_h_to_4h
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0, -1] for ids in prompts]
    handle.remove()
    return torch.cat(seen), torch.stack(logits)


def with_large_mlp_unit(checkpoint, out_dir, prompts, target):
    """A copy of `checkpoint` whose largest layer-0 MLP unit reaches `target` before relu^2 on
    `prompts`: its W1 row and bias times c, its W2 column over c^2. relu(c x)^2 / c^2 = relu(x)^2,
    so in exact arithmetic the model computes what it did; only the intermediate grows by c^2."""
    pre, _ = mlp_preactivations(checkpoint, prompts)
    unit = int(pre.max(0).values.argmax())
    c = target / float(pre[:, unit].max())
    shutil.copytree(checkpoint, out_dir)
    weights = load_file(os.path.join(out_dir, "model.safetensors"))
    prefix = f"model.layers.{MLP_UNIT_LAYER}.mlp"
    weights[f"{prefix}.dense_h_to_4h.weight"][unit] *= c
    weights[f"{prefix}.dense_h_to_4h.bias"][unit] *= c
    weights[f"{prefix}.dense_4h_to_h.weight"][:, unit] /= c * c
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return str(out_dir)


def without_relu2_scale(build_dir, checkpoint, out_dir):
    """A copy of an fp16 build storing the checkpoint's weights as they are: relu^2 scale 1.

    The scale lives in the weights only (docs/design.md), so the graph stays; every other tensor
    must come out bit-equal to what the exporter stored, which checks this copy's layout (linear
    weights [in, out], LayerNorm parameters fp32) against the exporter's.
    """
    shutil.copytree(build_dir, out_dir)
    model_path = os.path.join(out_dir, "model.onnx")
    model = onnx.load(model_path)
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    changed = set()
    for proto in model.graph.initializer:
        built = numpy_helper.to_array(proto)
        weight = weights[proto.name].float().numpy()
        if weight.ndim == 2 and proto.name != "model.embed_tokens.weight":
            weight = weight.T
        stored = weight.astype(built.dtype)
        if not np.array_equal(stored, built):
            changed.add(proto.name)
        proto.CopyFrom(numpy_helper.from_array(stored, proto.name))
    scaled = {f"model.layers.{i}.mlp.{name}" for i in range(2)
              for name in ("dense_h_to_4h.weight", "dense_h_to_4h.bias", "dense_4h_to_h.weight")}
    assert changed and changed <= scaled  # a layer whose scale is 1 stores what it did
    os.remove(model_path + ".data")
    onnx.save_model(model, model_path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    manifest = Manifest.load(out_dir, verify_checksums=False)
    for name in ("model.onnx", "model.onnx.data"):
        path = os.path.join(out_dir, name)
        manifest.files[name] = FileEntry(os.path.getsize(path), sha256_file(path))
    manifest.save(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def large_unit(tiny_checkpoint, fp16_build, tmp_path_factory):
    """large_unit(target) -> (checkpoint, its fp16 build or the ExportError refusing it, an fp16
    build of it without the relu^2 scale, transformers' fp32 logits of each prompt's last token),
    made once per target. Where the exporter refuses, the unscaled copy is made from the tiny
    checkpoint's build: same graph, and every weight is rewritten from the checkpoint."""
    made = {}

    def make(target):
        if target not in made:
            root = tmp_path_factory.mktemp(f"unit{int(target)}")
            prompts = prompt_ids(tiny_checkpoint)
            checkpoint = with_large_mlp_unit(tiny_checkpoint, root / "checkpoint", prompts, target)
            pre, reference = mlp_preactivations(checkpoint, prompts)
            assert pre.max() == pytest.approx(target, rel=1e-3)
            scaled = base = str(root / "scaled")
            try:
                build(checkpoint, scaled, BuildOptions(dtype="float16", max_batch=2, kv_capacity=96,
                                                       backend="onnxruntime"))
            except ExportError as refused:
                scaled, base = refused, fp16_build
            made[target] = checkpoint, scaled, without_relu2_scale(base, checkpoint, root / "unscaled"), reference
        return made[target]
    return make


# (pre-activation, whether the exporter's own build must hold): relu(1000)^2 overflows fp16 unless
# scaled, and any relu^2 scale the exporter picks must bring it into range. 4200 is past what the
# largest scale 16 covers (256 * 16 = 4096): the range report measures it on its calibration
# prompts and the exporter refuses the float16 build (tests/test_ranges.py tests the refusal).
@pytest.mark.parametrize("target, scaled_build_holds", [(1000.0, True), (4200.0, False)])
def test_emulation_shows_the_relu2_overflow_that_onnxruntime_cpu_hides(tiny_checkpoint, large_unit, target,
                                                                       scaled_build_holds):
    prompts = prompt_ids(tiny_checkpoint)
    _, scaled, unscaled, reference = large_unit(target)
    cpu, _ = onnxruntime_prefill(unscaled, prompts)
    assert np.isfinite(cpu).all()  # computed in fp32 on CPU: relu(target)^2 fits
    emulated, _ = prefill(EmulatedBackend(unscaled), prompts)
    assert not np.isfinite(emulated).any()  # relu(target)^2 > 65504: inf, then NaN through LayerNorm

    if scaled_build_holds:
        emulated, _ = prefill(EmulatedBackend(scaled), prompts)
        bound = FP16_BOUND * float(reference.abs().max())
        assert np.abs(emulated - reference.numpy()).max() <= bound
    else:
        assert isinstance(scaled, ExportError)
        assert str(scaled).endswith("build with --dtype bfloat16 (for TensorRT) or --dtype float32")


def test_parity_emulate_fails_the_overflow_that_onnxruntime_cpu_passes(large_unit, capsys):
    from persimmon_export import cli as export_cli

    checkpoint, _, unscaled, _ = large_unit(1000.0)
    prompt_flags = [flag for prompt in PROMPTS for flag in ("--prompt", prompt)]
    code = export_cli.main(["parity", "--checkpoint", checkpoint, "--build", unscaled, "--steps", "2", "--emulate",
                            "-q", *prompt_flags])
    lines = capsys.readouterr().out.splitlines()
    logits = 3 * len(PROMPTS) * Manifest.load(unscaled).model.vocab_size  # prefill + 2 steps, every row
    assert code == 1 and lines[-1] == "parity: FAILED for emulated"
    assert lines[0].startswith("onnxruntime  float16") and lines[0].endswith("PASS")
    assert lines[1].startswith("emulated     float16") and "prefill nan" in lines[1] and lines[1].endswith("FAIL")
    assert lines[2].startswith("  emulated: the float16 graph on CPU")
    assert lines[2].endswith(f"non-finite logits {logits}/{logits}")


def test_parity_emulate_passes_a_build_that_holds(tiny_checkpoint, fp16_build):
    results = check_parity(tiny_checkpoint, fp16_build, prompts=PROMPTS, decode_steps=2, emulate=True)
    assert [(r.backend, r.passed) for r in results] == [("onnxruntime", True), ("emulated", True)]
    logits = 3 * len(PROMPTS) * Manifest.load(fp16_build).model.vocab_size
    assert results[1].note.endswith(f"non-finite logits 0/{logits}") and results[0].note == ""


def _gpu_fp16_logits(checkpoint, prompts):
    """transformers in fp16 on a CUDA GPU (cuBLAS fp16 arithmetic, as users run it there): each
    prompt's last-token logits, or a skip where there is no GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch: this test compares the emulation with real GPU fp16")
    model = transformers.PersimmonForCausalLM.from_pretrained(checkpoint, dtype=torch.float16).cuda().eval()
    with torch.no_grad():
        return np.stack([model(torch.tensor([ids]).cuda()).logits[0, -1].float().cpu().numpy() for ids in prompts])


@pytest.mark.gpu
def test_the_emulation_predicts_real_gpu_fp16_arithmetic(tiny_checkpoint, fp16_build, large_unit):
    """On a GPU: where fp16 holds, the emulated graph agrees with transformers' fp16 on the GPU
    within the fp16 bound; where an unscaled relu^2 overflows, both are non-finite - so the CPU
    emulation tells what a GPU's fp16 arithmetic will do."""
    prompts = prompt_ids(tiny_checkpoint)
    gpu = _gpu_fp16_logits(tiny_checkpoint, prompts)
    emulated = np.stack([emulated_step(fp16_build, np.array([ids]), np.zeros(1, np.int64), np.array([len(ids)]),
                                       np.ones((1, len(ids)), np.int64))[0] for ids in prompts])
    assert np.isfinite(gpu).all() and np.isfinite(emulated).all()
    difference = np.abs(emulated - gpu).max()
    print(f"emulated vs GPU fp16: max |dlogit| {difference:.2e}, largest |logit| {np.abs(gpu).max():.2f}")
    assert difference <= FP16_BOUND * np.abs(gpu).max()
    assert (emulated.argmax(-1) == gpu.argmax(-1)).all()

    checkpoint, scaled, unscaled, _ = large_unit(1000.0)  # relu(1000)^2 = 1e6 > 65504 unless scaled
    gpu = _gpu_fp16_logits(checkpoint, prompts)  # transformers has no relu^2 scale
    unscaled_emulated, _ = prefill(EmulatedBackend(unscaled), prompts)
    assert not np.isfinite(gpu).all() and not np.isfinite(unscaled_emulated).all()
    assert np.isfinite(prefill(EmulatedBackend(scaled), prompts)[0]).all()  # the exporter's scale holds
