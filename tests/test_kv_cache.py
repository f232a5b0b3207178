"""`build --kv-cache int8` (issue 28): onnxruntime float32 builds whose KV cache is int8, one scale
per (head, channel) of each layer's keys and values from the fp32 reference on the calibration
prompts (onnxruntime's GroupQueryAttention quantizes and dequantizes it). Parity against the fp32
reference (transformers-equivalent torch model) holds to int8's bounds, the cache takes a quarter of
the memory, and what cannot hold such a cache is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import error_line, og_greedy
from test_compat import VENVS, run_in_venv

from persimmon_export.build import build
from persimmon_export.graph.export import ExportError
from persimmon_export.options import BuildOptions
from persimmon_export.validate.parity import check_parity
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import Manifest


@pytest.fixture(scope="module")
def builds(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    out = {}
    for name, options in {"float32": {}, "int8": {"kv_cache": "int8"}}.items():
        out[name] = str(root / name)
        build(tiny_checkpoint, out[name], BuildOptions(dtype="float32", max_batch=4, kv_capacity=96,
                                                       backend="onnxruntime", **options))
    return out


def test_the_cache_is_int8_and_a_quarter_of_the_memory(builds):
    caches = {}
    for name, directory in builds.items():
        generator = Generator.load(directory)
        generator.generate("Hello there", max_new_tokens=2)
        caches[name] = generator.backend.caches[0].numpy()  # the first key cache, written in place
    assert Manifest.load(builds["int8"]).cache_dtype == "int8" and caches["int8"].dtype == np.int8
    assert caches["int8"].nbytes * 4 == caches["float32"].nbytes and caches["int8"].any()


def test_parity_with_the_fp32_reference_holds_to_int8_bounds(tiny_checkpoint, builds):
    [result] = check_parity(tiny_checkpoint, builds["int8"], decode_steps=12)
    assert result.dtype == "float32/kv-int8" and result.passed, result.line()
    [exact] = check_parity(tiny_checkpoint, builds["float32"], decode_steps=12)
    assert result.max_abs_diff > 10 * exact.max_abs_diff  # the cache really is rounded


def test_a_row_and_its_batch_agree_through_the_int8_cache(builds):
    generator = Generator.load(builds["int8"])
    prompts = ["Hello there, how are you", "1 2 3"]
    together = generator.generate(prompts, max_new_tokens=12, ignore_eos=True)
    alone = [generator.generate(p, max_new_tokens=12, ignore_eos=True) for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


@pytest.mark.parametrize("options,message", [
    (dict(dtype="float16", kv_cache="int8"), "--kv-cache int8 is for onnxruntime builds of --dtype float32"),
    (dict(dtype="float32", kv_cache="int4"), "--kv-cache 'int4': the choice is int8"),
    (dict(dtype="float32", kv_cache="int8", cache_layout="whole"), "has cache layout 'whole'"),
])
def test_what_cannot_hold_an_int8_cache_is_refused_in_one_line(tiny_checkpoint, tmp_path, options, message):
    with pytest.raises(ExportError, match=message) as error:
        build(tiny_checkpoint, str(tmp_path / "b"), BuildOptions(backend="onnxruntime", kv_capacity=64, **options))
    assert "\n" not in str(error.value) and not (tmp_path / "b").exists()


def test_an_onnxruntime_too_old_for_the_int8_cache_says_so(builds):
    refused = run_in_venv(VENVS["floors"], "import sys; from persimmon_runtime.cli import main; sys.exit(main())",
                          builds["int8"], "hi", "--max-new-tokens", "2")
    assert refused.returncode == 2
    line = error_line(refused.stderr)
    assert "int8 KV cache (build --kv-cache int8) needs onnxruntime 1.31 or newer" in line, line


def test_onnxruntime_genai_runs_an_int8_cache_build_as_written(builds):
    pytest.importorskip("onnxruntime_genai")
    generator = Generator.load(builds["int8"], prefill="off")
    ids = generator.tokenizer.encode("Hello there, how are you")
    expected = generator.generate("Hello there, how are you", max_new_tokens=12, ignore_eos=True).token_ids
    assert og_greedy(builds["int8"], [ids], 12)[0] == expected
