"""The float16 range report (issue 13): the maxima a build records equal what transformers'
fp32 model computes on the same prompts, a measured pre-activation bounds the relu^2 scale (a
refusal in one line when no scale holds it), --calibration-file errors are one line, and the
manifest's `ranges` section round-trips."""

import json
import os
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.persimmon import modeling_persimmon

from persimmon_export import cli as export_cli
from persimmon_export.build import build
from persimmon_export.graph.export import ExportError
from persimmon_export.graph.ranges import MAX_CALIBRATION_PROMPTS, MAX_PROMPT_CHARS
from persimmon_export.options import BuildOptions
from persimmon_runtime import Tokenizer
from persimmon_runtime.manifest import Manifest, ManifestError, RangeSection, WeightRange

PROMPTS = ["human: What is the capital of France? adept:", "The quick brown fox", "1 2 3 4 5 6 7 8 9 10 11"]
LAYER = 0
W1, W2 = f"model.layers.{LAYER}.mlp.dense_h_to_4h", f"model.layers.{LAYER}.mlp.dense_4h_to_h.weight"


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return str(path)


def fp16_build(checkpoint, out, calibration_file):
    return build(checkpoint, str(out), BuildOptions(dtype="float16", max_batch=2, kv_capacity=96, backend="onnxruntime",
                                                    calibration_file=calibration_file))


def transformers_maxima(checkpoint) -> dict:
    """max |x| per layer and kind in transformers' fp32 PersimmonForCausalLM on PROMPTS (each alone),
    read with hooks on its own modules and its eager attention function."""
    model = transformers.PersimmonForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    layers = len(model.model.layers)
    seen = {}

    def keep(kind, layer, tensor):
        values = seen.setdefault(kind, [0.0] * layers)
        values[layer] = max(values[layer], float(tensor.abs().max()))

    def scores(module, query, key, value, attention_mask, scaling, **kwargs):
        product = torch.matmul(query, key.transpose(2, 3)) * scaling
        keep("attention_scores", module.layer_idx, product[..., torch.ones(product.shape[-2:]).tril().bool()])
        return eager(module, query, key, value, attention_mask, scaling, **kwargs)

    handles, inputs = [], {}

    def attention(i, out):  # returns None: a forward hook's result would replace the module's output
        keep("attention_output", i, out)
        keep("residual", i, inputs[i] + out)

    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        handles += [
            layer.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: inputs.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True),
            attn.query_key_value.register_forward_hook(lambda m, a, out, i=i: keep("qkv", i, out)),
            attn.q_layernorm.register_forward_hook(lambda m, a, out, i=i: keep("query", i, out)),
            attn.k_layernorm.register_forward_hook(lambda m, a, out, i=i: keep("key", i, out)),
            attn.register_forward_hook(lambda m, a, out, i=i: attention(i, out[0])),
            mlp.dense_h_to_4h.register_forward_hook(lambda m, a, out, i=i: keep("mlp_pre_activation", i, out)),
            mlp.dense_4h_to_h.register_forward_pre_hook(lambda m, a, i=i: keep("mlp_activation", i, a[0])),
            mlp.register_forward_hook(lambda m, a, out, i=i: keep("mlp_output", i, out)),
            layer.register_forward_hook(
                lambda m, a, out, i=i: keep("residual", i, out[0] if isinstance(out, tuple) else out)),
        ]
    eager = modeling_persimmon.eager_attention_forward
    tokenizer = Tokenizer.from_dir(checkpoint)
    logits = 0.0
    try:
        modeling_persimmon.eager_attention_forward = scores
        with torch.no_grad():
            for prompt in PROMPTS:
                out = model(torch.tensor([tokenizer.encode(prompt)])).logits
                logits = max(logits, float(out.abs().max()))
    finally:
        modeling_persimmon.eager_attention_forward = eager
        for handle in handles:
            handle.remove()
    return {"layers": seen, "logits": logits}


@pytest.fixture(scope="module")
def tiny_fp16(tiny_checkpoint, calibration_file, tmp_path_factory):
    """The tiny checkpoint's float16 build directory, calibrated on PROMPTS; tests must not change it."""
    out = tmp_path_factory.mktemp("ranges") / "fp16"
    fp16_build(tiny_checkpoint, out, calibration_file)
    return str(out)


def test_the_reports_maxima_equal_transformers_measured_on_the_same_prompts(tiny_checkpoint, tiny_fp16):
    ranges = Manifest.load(tiny_fp16).ranges
    expected = transformers_maxima(tiny_checkpoint)
    assert set(expected["layers"]) == set(ranges.activations)
    assert ranges.relu2_scales == [16.0, 16.0]  # tiny weights: the largest scale everywhere
    # the report holds what the fp16 graph stores: the MLP's pre-activation / s, its relu^2 / s^2
    unscaled = dict(ranges.activations)
    unscaled["mlp_pre_activation"] = [v * s for v, s in zip(unscaled["mlp_pre_activation"], ranges.relu2_scales)]
    unscaled["mlp_activation"] = [v * s * s for v, s in zip(unscaled["mlp_activation"], ranges.relu2_scales)]
    for kind, values in expected["layers"].items():
        assert unscaled[kind] == pytest.approx(values, rel=1e-5), kind
    assert ranges.logits == pytest.approx(expected["logits"], rel=1e-5)
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    assert (ranges.calibration, ranges.prompts) == ("prompts.txt", len(PROMPTS))
    assert ranges.tokens == sum(len(tokenizer.encode(p)) for p in PROMPTS)


def test_the_weight_ranges_are_the_stored_tensors_after_folding(tiny_checkpoint, tiny_fp16):
    ranges = Manifest.load(tiny_fp16).ranges
    weights = {w.tensor: w.max_abs for w in ranges.weights}
    checkpoint = load_file(os.path.join(tiny_checkpoint, "model.safetensors"))
    s = ranges.relu2_scales[LAYER]
    assert weights[W2] == pytest.approx(float(checkpoint[W2].abs().max()) * s * s, rel=1e-6)
    assert weights[f"{W1}.weight"] == pytest.approx(float(checkpoint[f"{W1}.weight"].abs().max()) / s, rel=1e-6)
    assert not [name for name in weights if "layernorm" in name]  # stored in fp32: no fp16 range
    largest = max([*weights.values(), ranges.logits, *(v for vs in ranges.activations.values() for v in vs)])
    assert ranges.lowest_headroom == pytest.approx(65504 / largest)
    assert ranges.lowest_at == W2  # the W2 * 256 of the tiny model is its largest stored value


def with_large_mlp_unit(checkpoint, out, target, w2_entry=None):
    """A copy of `checkpoint` whose largest layer-0 MLP unit reaches `target` before relu^2 on
    PROMPTS (W1 row and bias times c, W2 column over c^2: the same function, larger inside), and
    optionally one W2 entry, in another unit's column, set to `w2_entry`."""
    pre = transformers_maxima_of_units(checkpoint)
    unit = int(pre.argmax())
    c = target / float(pre[unit])
    shutil.copytree(checkpoint, out)
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    tensors[f"{W1}.weight"][unit] *= c
    tensors[f"{W1}.bias"][unit] *= c
    tensors[W2][:, unit] /= c * c
    if w2_entry is not None:
        tensors[W2][5, (unit + 1) % tensors[W2].shape[1]] = w2_entry
    save_file(tensors, path, metadata={"format": "pt"})
    return str(out)


def transformers_maxima_of_units(checkpoint) -> torch.Tensor:
    """transformers' largest layer-0 pre-activation per MLP unit on PROMPTS."""
    model = transformers.PersimmonForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    seen = []
    handle = model.model.layers[LAYER].mlp.dense_h_to_4h.register_forward_hook(
        lambda m, a, out: seen.append(out[0].amax(0)))
    tokenizer = Tokenizer.from_dir(checkpoint)
    with torch.no_grad():
        for prompt in PROMPTS:
            model(torch.tensor([tokenizer.encode(prompt)]))
    handle.remove()
    return torch.stack(seen).amax(0)


def test_a_measured_pre_activation_within_the_largest_scale_builds(tiny_checkpoint, calibration_file, tmp_path):
    checkpoint = with_large_mlp_unit(tiny_checkpoint, tmp_path / "ckpt", 2000.0)
    ranges = fp16_build(checkpoint, tmp_path / "b", calibration_file).ranges
    assert ranges.relu2_scales[LAYER] == 16.0
    assert ranges.activations["mlp_pre_activation"][LAYER] * 16 == pytest.approx(2000.0, rel=1e-4)
    assert ranges.activations["mlp_activation"][LAYER] == pytest.approx((2000.0 / 16) ** 2, rel=1e-3)


@pytest.mark.parametrize("target, w2_entry, scale", [(4000.0, None, 16), (2000.0, 300.0, 8)])
def test_no_scale_that_holds_the_measured_relu2_output_is_refused_in_one_line(tiny_checkpoint, calibration_file,
                                                                              tmp_path, target, w2_entry, scale):
    """4000 overflows the margin even at scale 16: (4000/16)^2 = 62500 > 32752. 2000 fits at 16, but a
    W2 entry of 300 allows only 8 in that layer (300 * 16^2 > 32752) and (2000/8)^2 = 62500."""
    checkpoint = with_large_mlp_unit(tiny_checkpoint, tmp_path / "ckpt", target, w2_entry)
    with pytest.raises(ExportError) as error:
        fp16_build(checkpoint, tmp_path / "b", calibration_file)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"model.layers.{LAYER} mlp_activation reaches 6.25e+04 in float16 at relu^2 scale "
                              f"{scale} ")
    assert message.endswith("build with --dtype bfloat16 (for TensorRT) or --dtype float32")
    assert not os.path.exists(tmp_path / "b")
    build(checkpoint, str(tmp_path / "b32"), BuildOptions(dtype="float32", max_batch=2, kv_capacity=96,
                                                          backend="onnxruntime"))


def test_float32_builds_have_no_report(tiny_build):
    assert Manifest.load(tiny_build).ranges is None


def test_the_report_is_skipped_with_a_warning_when_the_fp32_model_would_not_fit(tiny_checkpoint, tmp_path, caplog,
                                                                               monkeypatch):
    """An 8B float16 build must still run where its fp32 reference (about 35 GiB) does not fit."""
    from persimmon_export.graph import ranges

    monkeypatch.setattr(ranges, "available_memory_bytes", lambda: 2**10)  # what /proc/meminfo would say
    with caplog.at_level("WARNING"):
        build(tiny_checkpoint, str(tmp_path / "b"), BuildOptions(dtype="float16", max_batch=1, kv_capacity=96,
                                                                 backend="onnxruntime"))
    assert Manifest.load(str(tmp_path / "b")).ranges is None
    assert "range report skipped: the fp32 reference needs about" in caplog.text


def run_build(capsys, checkpoint, out, *flags):
    code = export_cli.main(["build", "--checkpoint", checkpoint, "--out", str(out), "--backend", "onnxruntime",
                            "--kv-capacity", "96", *flags])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, r"--calibration-file .*missing.txt: cannot be read \(No such file or directory\); pass a text file"),
    (b"\xff\xfe bad", r"not UTF-8 text \(byte 0\); save it as UTF-8, one prompt per line"),
    (b"\n  \n", r"holds no prompt; write one prompt per line"),
    (b"hi\n" * (MAX_CALIBRATION_PROMPTS + 1), rf"{MAX_CALIBRATION_PROMPTS + 1}\+ prompts, at most "
                                              rf"{MAX_CALIBRATION_PROMPTS}; keep a varied few"),
    (b"ok\n" + b"x" * (MAX_PROMPT_CHARS + 1), rf"line 2 is longer than {MAX_PROMPT_CHARS} characters; shorten it"),
], ids=["missing", "not-utf8", "empty", "too-many", "too-long"])
def test_calibration_file_errors_are_one_line(tiny_checkpoint, tmp_path, capsys, content, message):
    path = tmp_path / ("missing.txt" if content is None else "prompts.txt")
    if content is not None:
        path.write_bytes(content)
    code, err = run_build(capsys, tiny_checkpoint, tmp_path / "b", "--calibration-file", str(path))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("persimmon-export build: error: ")
    assert re.search(message, err)
    assert not os.path.exists(tmp_path / "b")


def test_calibration_file_is_refused_for_float32(tiny_checkpoint, calibration_file, tmp_path, capsys):
    code, err = run_build(capsys, tiny_checkpoint, tmp_path / "b", "--dtype", "float32",
                          "--calibration-file", calibration_file)
    assert code == 2 and err.count("\n") == 1
    assert "--calibration-file is for --dtype float16 builds (the range report) and --kv-cache int8 (its scales); " \
           "this build is float32" in err


def test_the_build_prints_the_lowest_headroom(tiny_checkpoint, calibration_file, tmp_path, capsys):
    code = export_cli.main(["build", "--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "b"),
                            "--backend", "onnxruntime", "--kv-capacity", "96", "--calibration-file", calibration_file])
    out, err = capsys.readouterr()
    last = err.splitlines()[-1]  # the log's last line; stdout has the result
    assert out.startswith(f"built {tmp_path / 'b'}: causal-lm float16")
    ranges = Manifest.load(str(tmp_path / "b")).ranges
    assert code == 0 and last.startswith(f"float16 range report ({len(PROMPTS)} prompts, ")
    assert f"lowest headroom {ranges.lowest_headroom:.3g}x at {ranges.lowest_at} " in last


def _load_changed(build_dir, tmp_path, change):
    """Manifest.load of a copy of build_dir whose manifest.json `change` edited."""
    copy = tmp_path / "b"
    shutil.copytree(build_dir, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    change(raw)
    (copy / "manifest.json").write_text(json.dumps(raw))
    return Manifest.load(str(copy), verify_checksums=False)


def test_the_ranges_section_round_trips(tiny_fp16, tmp_path):
    manifest = Manifest.load(tiny_fp16)
    assert isinstance(manifest.ranges, RangeSection) and isinstance(manifest.ranges.weights[0], WeightRange)
    assert manifest.ranges.weights[0].max_abs > 0 and len(manifest.ranges.relu2_scales) == 2
    manifest.save(str(tmp_path))
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved == json.loads(open(os.path.join(tiny_fp16, "manifest.json")).read())
    assert _load_changed(tiny_fp16, tmp_path, lambda raw: None).ranges == manifest.ranges


def test_a_build_from_before_the_report_still_loads(tiny_fp16, tmp_path):
    assert _load_changed(tiny_fp16, tmp_path, lambda raw: raw.pop("ranges")).ranges is None


@pytest.mark.parametrize("change, message", [
    (lambda r: r["ranges"]["activations"]["residual"].append(1.0),
     r"ranges has per-layer lists of \[2, 3\] values, but model.num_hidden_layers is 2"),
    (lambda r: r["ranges"]["activations"]["qkv"].__setitem__(0, -1.0),
     r"field ranges.activations.qkv\[0\] must be a finite number >= 0, got float -1.0"),
    (lambda r: r["ranges"]["relu2_scales"].__setitem__(0, 3.0),
     r"field ranges.relu2_scales\[0\] must be a power of two in 1..16, got float 3.0"),
    (lambda r: r["ranges"]["activations"].pop("key"), r"field ranges.activations.key is missing"),
], ids=["length", "negative", "scale", "missing"])
def test_a_bad_ranges_section_is_refused_in_one_line(tiny_fp16, tmp_path, change, message):
    with pytest.raises(ManifestError, match=message) as error:
        _load_changed(tiny_fp16, tmp_path, change)
    assert "\n" not in str(error.value)


def test_a_float16_build_whose_mlp_output_overflows_is_refused_before_the_export(tiny_checkpoint, calibration_file,
                                                                                  tmp_path):
    """The campaign's case: layer 0's MLP output reached 1.4e5 and the build passed with a warning
    (parity --emulate then found every logit non-finite). W2 and its bias times c: the output times c."""
    model = transformers.PersimmonForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    seen = []
    handle = model.model.layers[LAYER].mlp.register_forward_hook(lambda m, a, out: seen.append(out.abs().max()))
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)
    with torch.no_grad():
        for prompt in PROMPTS:
            model(torch.tensor([tokenizer.encode(prompt)]))
    handle.remove()
    c = 1.4e5 / float(max(seen))
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    tensors[W2] *= c
    tensors[W2.replace("weight", "bias")] *= c
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError) as error:
        fp16_build(str(checkpoint), tmp_path / "b", calibration_file)
    message = str(error.value)
    assert re.match(rf"model\.layers\.{LAYER} (mlp_output|residual) reaches 1\.[0-9]+e\+05 in the fp32 reference", message)
    assert "past float16's largest value 65504" in message and message.endswith("or --dtype float32")
    assert "\n" not in message and not os.path.exists(tmp_path / "b")
