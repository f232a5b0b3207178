"""onnxruntime-genai (the ONNX ecosystem's LLM runtime, a test dependency) runs a build as written:
`og.Model(BUILD)` reads the genai_config.json the build writes, feeds the graph input_ids,
attention_mask and shared past/present buffers, and reads [batch, 1, vocab] logits. Its greedy
tokens equal persimmon_runtime's on the same graph (prefill="off": onnxruntime-genai knows nothing
of the int8 prefill graph), and a batch of prompts of different lengths, which onnxruntime-genai
takes right-padded with the config's pad_token_id, equals each prompt alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import og_greedy

from persimmon_export.build import build
from persimmon_export.deploy.genai import GENAI_CONFIG_FILE
from persimmon_export.engine.tensorrt import EngineOptions
from persimmon_export.options import BuildOptions
from persimmon_runtime.generator import Generator
from persimmon_runtime.manifest import Manifest

og = pytest.importorskip("onnxruntime_genai")

PROMPTS = ["Hello there, how are you", "The quick brown fox jumps", "a", "1 2 3 4 5 6 7 8 9 10 11 12"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def builds(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    out = {}
    for name, options in {"float32": {}, "int4": {"weights": "int4", "prefill": "int8"}}.items():
        out[name] = str(root / name)
        build(tiny_checkpoint, out[name], BuildOptions(dtype="float32", max_batch=4, kv_capacity=256,
                                                       backend="onnxruntime", **options))
    return out


def ours(directory: str) -> list[list[int]]:
    generator = Generator.load(directory, prefill="off")
    return [c.token_ids for c in generator.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)]


def test_the_build_writes_what_onnxruntime_genai_loads(builds):
    manifest = Manifest.load(builds["float32"], verify_checksums=True)  # genai_config.json is listed and checked
    assert GENAI_CONFIG_FILE in manifest.files
    config = json.load(open(os.path.join(builds["float32"], GENAI_CONFIG_FILE)))
    decoder = config["model"]["decoder"]
    assert config["model"]["context_length"] == config["search"]["max_length"] == manifest.kv_capacity
    assert decoder["num_hidden_layers"] == manifest.model.num_hidden_layers
    assert decoder["filename"] == manifest.onnx.file and config["search"]["past_present_share_buffer"]
    og.Model(builds["float32"])  # loads as written: no edits, no custom-op library


@pytest.mark.parametrize("precision", ["float32", "int4"])
def test_greedy_tokens_equal_persimmon_runtimes(builds, precision):
    """Prompts one at a time (batch 1, no padding): the same tokens as our Generator."""
    tokenizer = Generator.load(builds[precision]).tokenizer
    expected = ours(builds[precision])
    for prompt, want in zip(PROMPTS, expected):
        got = og_greedy(builds[precision], [tokenizer.encode(prompt)], NEW_TOKENS)[0]
        assert got == want, (prompt, got, want)


def test_a_padded_batch_of_different_prompts_equals_each_prompt_alone(builds):
    """onnxruntime-genai writes every row at the same cache slots and right-pads the prompts: the
    graph finds each row's tokens and positions from the mask and keeps padded slots out of
    attention, so each row continues as it does alone."""
    tokenizer = Generator.load(builds["float32"]).tokenizer
    rows = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(r) for r in rows}) > 1  # different lengths: padding is exercised
    batched = og_greedy(builds["float32"], rows, NEW_TOKENS)
    alone = [og_greedy(builds["float32"], [row], NEW_TOKENS)[0] for row in rows]
    assert batched == alone == ours(builds["float32"])


def test_no_genai_config_where_onnxruntime_genai_cannot_run_the_graph(tiny_checkpoint, tmp_path):
    """A TensorRT-RTX build's graph is the `window` layout (first_slot/token_count inputs): no config."""
    pytest.importorskip("tensorrt_rtx")
    out = str(tmp_path / "rtx")
    build(tiny_checkpoint, out, BuildOptions(dtype="float16", max_batch=2, kv_capacity=64, backend="tensorrt-rtx",
                                             engine=EngineOptions(max_prefill=16)))
    assert not os.path.exists(os.path.join(out, GENAI_CONFIG_FILE))
    assert GENAI_CONFIG_FILE not in Manifest.load(out).files


def test_the_documented_example_runs_as_written(builds):
    """docs/onnxruntime-genai.md's Python block, on a build like the README's demo/build32."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "onnxruntime-genai.md")).read()
    code = re.search(r"```python\n(.*?)```", doc, re.DOTALL).group(1).replace("demo/build32", builds["float32"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    generator = Generator.load(builds["float32"], prefill="off")
    prompt = "human: Hi there\n\nadept:"
    expected = generator.generate(prompt, max_new_tokens=256 - len(generator.tokenizer.encode(prompt))).text
    assert done.stdout == expected + "\n"
