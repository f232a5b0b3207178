"""The `capacity` cache layout of onnxruntime builds (exporter/persimmon_export/graph/attention.py):
GroupQueryAttention over caches allocated once at kv_capacity slots, never grown or copied,
with outputs equal to transformers' across the slots where `whole`-layout caches used to grow."""

import os

import numpy as np
import onnx
import pytest
import torch
import transformers

from persimmon_export.build import build
from persimmon_export.options import BuildOptions
from persimmon_runtime import PersimmonError
from persimmon_runtime.generator import Generator
from persimmon_runtime.sampling import SamplingParams

CAPACITY = 320  # past 256, the first slot where a `whole`-layout cache grew by copying
NEW_TOKENS = 280
PROMPTS = ["human: hi\n\nadept:", "The quick brown fox jumps over the lazy dog", "1 2 3 4 5 6 7 8 9"]


@pytest.fixture(scope="module")
def build_dir(tiny_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("capacity") / "b")
    build(tiny_checkpoint, out, BuildOptions(dtype="float32", max_batch=4, kv_capacity=CAPACITY, backend="onnxruntime"))
    return out


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, build_dir):
    """transformers' greedy continuation of each prompt (the independent reference)."""
    tokenizer = Generator.load(build_dir).tokenizer
    hf = transformers.PersimmonForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            out[prompt] = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    return out


def _cache_buffers(backend) -> list[tuple[int, tuple]]:
    """(address, shape) of every cache buffer the backend holds."""
    return [(value.data_ptr(), tuple(value.shape())) for value in backend.caches]


def _prepare(generator, prompt):
    """The prompt's Sequence, greedy for NEW_TOKENS tokens, to hand to the scheduler directly."""
    return generator._prepare([prompt], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))


def test_onnxruntime_builds_attend_with_group_query_attention(build_dir):
    model = onnx.load(os.path.join(build_dir, "model.onnx"), load_external_data=False)
    ops = [node.op_type for node in model.graph.node]
    layers = Generator.load(build_dir).manifest.model.num_hidden_layers
    assert ops.count("GroupQueryAttention") == layers and "TensorScatter" not in ops and "Softmax" not in ops
    assert ("com.microsoft", 1) in {(o.domain, o.version) for o in model.opset_import}
    past = next(i for i in model.graph.input if i.name == "past_key_0")
    assert past.type.tensor_type.shape.dim[2].dim_value == CAPACITY  # static: all slots, allocated once


def test_the_cache_is_allocated_once_and_never_grows_through_a_long_generation(build_dir, expected):
    """Two prompts decode 280 tokens each, past slot 256: after every step the caches are the same
    buffers of kv_capacity slots as after start, and the tokens are transformers'."""
    generator = Generator.load(build_dir)
    seen = []
    generator.scheduler.on_step = lambda requests: seen.append(_cache_buffers(generator.backend))
    completions = generator.generate(PROMPTS[:2], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert len(seen) >= NEW_TOKENS
    assert all(buffers == seen[0] for buffers in seen)
    assert {shape[2] for _, shape in seen[0]} == {CAPACITY}
    for prompt, completion in zip(PROMPTS, completions):
        assert completion.token_ids == expected[prompt]


def test_rows_admitted_mid_flight_match_transformers(build_dir, expected):
    """While the first request decodes past slot 256, two more arrive (from inside its steps, so
    deterministically) and are prefilled in chunks of 8 tokens beside it, one chunk over cached
    slots per row; the caches never move and every completion is transformers'."""
    loaded = Generator.load(build_dir)
    generator = Generator(loaded.backend, loaded.tokenizer, prefill_chunk=8)
    steps, seen, late = [], [], []
    real_step = generator.backend.step
    generator.backend.step = lambda ids, *rest: steps.append(ids.shape) or real_step(ids, *rest)

    def on_step(requests):
        seen.append(_cache_buffers(generator.backend))
        if len(steps) in (240, 260):  # the first request is near / past slot 256
            late.append(generator.scheduler.submit(_prepare(generator, PROMPTS[1 + len(late)])))

    generator.scheduler.on_step = on_step
    first = generator.scheduler.submit(_prepare(generator, PROMPTS[0]))
    list(first.events())
    for request in late:
        list(request.events())
    assert len(late) == 2 and all(buffers == seen[0] for buffers in seen)
    assert any(rows == 1 and seq == 8 for rows, seq in steps)  # chunks over cached slots ran
    assert first.sequences[0].token_ids == expected[PROMPTS[0]]
    for prompt, request in zip(PROMPTS[1:], late):
        assert request.sequences[0].token_ids == expected[prompt]


def test_several_rows_prefilling_over_cached_slots_match_one_row_at_a_time(build_dir):
    """A chunk of new tokens on rows that already hold some (GroupQueryAttention takes those one row
    at a time; the backend splits the step) gives each row's logits as a step over that row alone."""
    backend = Generator.load(build_dir).backend
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, backend.manifest.model.vocab_size, (2, 30))

    def run(rows_together):
        backend.start(2)
        backend.step(prompts[:, :20], np.zeros(2, np.int64), np.array([20, 20]), np.ones((2, 20), np.int64))
        chunk, first, count = prompts[:, 20:], np.array([20, 20]), np.array([10, 6])
        if rows_together:
            return backend.step(chunk, first, count, np.ones((2, 30), np.int64))
        return np.concatenate([backend.step(chunk[r:r + 1], first[r:r + 1], count[r:r + 1],
                                            np.ones((1, 30), np.int64), r) for r in range(2)])

    assert np.abs(run(True) - run(False)).max() == 0.0


def test_a_request_past_the_capacity_is_still_refused_in_one_line(build_dir):
    generator = Generator.load(build_dir)
    with pytest.raises(PersimmonError, match="kv_capacity 320") as error:
        generator.generate("hello there", max_new_tokens=CAPACITY)
    assert "\n" not in str(error.value)


def test_a_mask_with_zeros_is_refused_rather_than_ignored(build_dir):
    """GroupQueryAttention reads no mask values: a caller's left padding would be attended to."""
    backend = Generator.load(build_dir).backend
    backend.start(1)
    with pytest.raises(PersimmonError, match="attention_mask is 0 at row 0, slot 1"):
        backend.step(np.array([[5, 6, 7]]), np.zeros(1, np.int64), np.array([3]), np.array([[1, 0, 1]]))


def test_right_padded_rows_of_a_first_step_compute_what_they_compute_alone(build_dir):
    """A fresh batch whose shorter rows are right-padded (as onnxruntime-genai sends one, and as the
    scheduler's prompt steps are): each row's logits, and the decode steps after, equal the row alone."""
    backend = Generator.load(build_dir).backend
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]

    def run(prompts):
        backend.start(len(prompts))
        width = max(map(len, prompts))
        ids = np.array([p + [0] * (width - len(p)) for p in prompts])
        counts = np.array([len(p) for p in prompts])
        logits = [backend.step(ids, np.zeros(len(prompts), np.int64), counts, np.ones((len(prompts), width), np.int64))]
        for token in (20, 21, 22):
            logits.append(backend.step(np.full((len(prompts), 1), token), counts, np.ones(len(prompts), np.int64),
                                       np.ones((len(prompts), int(counts.max()) + 1), np.int64)))
            counts = counts + 1
        return np.stack(logits, axis=1)  # [rows, steps, vocab]

    together = run(rows)
    for r, row in enumerate(rows):
        assert np.abs(together[r] - run([row])[0]).max() < 1e-5
