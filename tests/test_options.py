"""BuildOptions: one place for the build's defaults and cross-checks, filled by the CLI from its flags."""

import dataclasses
import os

import pytest

from persimmon_export.cli import build_parser
from persimmon_export.cli import _build_options as options_from_args
from persimmon_export.config import PersimmonConfig
from persimmon_export.engine.tensorrt import EngineOptions
from persimmon_export.options import BuildOptions
from persimmon_runtime import PersimmonError

LIBRARY_ONLY = {"quantize_lm_head", "cache_layout", "engine"}  # no flag: the library call's own fields


def _parse(*flags):
    return build_parser().parse_args(["build", "--checkpoint", "ck", "--out", "out", *flags])


def test_leaving_every_flag_out_gives_the_library_defaults():
    assert options_from_args(_parse()) == BuildOptions()


def test_every_flag_reaches_its_field():
    args = _parse("--dtype", "float32", "--task", "causal-lm", "--max-batch", "3", "--kv-capacity", "80",
                  "--backend", "tensorrt-rtx", "--weights", "int4", "--block-size", "64", "--prefill", "none",
                  "--calibration-file", "prompts.txt", "--overwrite", "--max-prefill", "16", "--plugins", "off",
                  "--compute-capabilities", "8.6", "8.9", "--version-compatible", "--timing-cache", "t.cache",
                  "--opt-level", "2", "--workspace-gb", "0.5", "--kv-cache", "int8")
    options = options_from_args(args)
    assert options == BuildOptions(
        dtype="float32", task="causal-lm", max_batch=3, kv_capacity=80, backend="tensorrt-rtx", weights="int4",
        block_size=64, prefill="none", calibration_file="prompts.txt", overwrite=True, kv_cache="int8",
        engine=EngineOptions(max_prefill=16, plugins="off", compute_capabilities=("8.6", "8.9"),
                             version_compatible=True, timing_cache="t.cache", opt_level=2, workspace_mib=512))
    # every field but the library-only ones differs from its default here: none is unreachable from the CLI
    unset = [f.name for f in dataclasses.fields(BuildOptions) if f.name not in LIBRARY_ONLY | {"max_text_tokens"}
             and getattr(options, f.name) == getattr(BuildOptions(), f.name)]
    unset += [f.name for f in dataclasses.fields(EngineOptions)
              if getattr(options.engine, f.name) == getattr(EngineOptions(), f.name)]
    assert unset == []
    assert options_from_args(_parse("--task", "token-classification", "--max-text-tokens", "40")).max_text_tokens == 40


def test_options_are_frozen():
    options = BuildOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.dtype = "float32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.engine.plugins = "on"


@pytest.mark.parametrize("fields, message", [
    (dict(dtype="float8"), r"--dtype 'float8' is not one of \('float16', 'bfloat16', 'float32'\)"),
    (dict(backend="vllm"), r"--backend 'vllm' is not available; choose one of"),
    (dict(max_batch=0), r"--max-batch must be in 1\.\.1024"),
    (dict(task="summarize"), r"--task 'summarize' is not one of"),
    (dict(kv_capacity=64, max_text_tokens=64), r"--kv-capacity is a causal LM's cache slots, --max-text-tokens a "),
    (dict(engine=dict(plugins="maybe")), r"--plugins 'maybe' is not one of \('auto', 'on', 'off'\)"),
    (dict(engine=dict(opt_level=9)), r"--opt-level must be in 0\.\.5, got 9"),
])
def test_a_bad_value_is_refused_when_the_options_are_made(fields, message):
    with pytest.raises(PersimmonError, match=message):
        if "engine" in fields:
            EngineOptions(**fields["engine"])
        else:
            BuildOptions(**fields)


def test_the_plan_fills_every_default_from_the_checkpoint(tiny_checkpoint):
    config = PersimmonConfig.from_file(tiny_checkpoint)
    plan = BuildOptions(backend="onnxruntime", dtype="float32").plan(tiny_checkpoint, config)
    options = plan.options
    assert (options.task, options.kv_capacity, options.max_text_tokens) == (
        "causal-lm", min(4096, config.max_position_embeddings), None)
    assert options.cache_layout == "capacity" and plan.flavor is None
    assert options.engine == EngineOptions(max_prefill=min(2048, options.kv_capacity))  # checked, unused
    assert (plan.weights, plan.prefill, plan.classifier) == (None, None, None)
    quantized = BuildOptions(backend="onnxruntime", weights="int4").plan(tiny_checkpoint, config)
    assert (quantized.weights.type, quantized.weights.block_size, quantized.prefill.type) == ("int4", 32, "int8")
    assert quantized.calibrated and not plan.calibrated  # float16 measures ranges first, float32 does not


def test_each_task_refuses_the_other_tasks_limit(tiny_checkpoint, tmp_path):
    config = PersimmonConfig.from_file(tiny_checkpoint)
    with pytest.raises(PersimmonError, match=r"--max-text-tokens is for classifier builds"):
        BuildOptions(backend="onnxruntime", max_text_tokens=32).plan(tiny_checkpoint, config)
    classifier = BuildOptions(backend="onnxruntime", task="sequence-classification")
    with pytest.raises(PersimmonError, match=r"a sequence-classification build has no cache: give its most tokens "
                                             r"per text as --max-text-tokens"):
        dataclasses.replace(classifier, kv_capacity=32).plan(tiny_checkpoint, config)
    plan = dataclasses.replace(classifier, max_text_tokens=32).plan(tiny_checkpoint, config)
    assert (plan.kv_capacity, plan.options.cache_layout, plan.classifier.labels) == (32, "none", ["LABEL_0", "LABEL_1"])
    assert os.listdir(tmp_path) == []  # planning writes nothing


def test_max_prefill_is_checked_whatever_the_backend(tiny_checkpoint):
    config = PersimmonConfig.from_file(tiny_checkpoint)
    with pytest.raises(PersimmonError, match=r"--max-prefill must be in \[1, kv_capacity=64\], got -5"):
        BuildOptions(backend="onnxruntime", kv_capacity=64, engine=EngineOptions(max_prefill=-5)).plan(
            tiny_checkpoint, config)
