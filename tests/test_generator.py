"""The runtime's generation loop on the onnxruntime backend: sampling, streaming, stops, batching."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from conftest import run_without_torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from persimmon_runtime import PersimmonError, format_chat
from persimmon_runtime.generator import Generator
from persimmon_runtime.sampling import Sampler, SamplingParams

PROMPTS = ["human: hi\n\nadept:", "The quick brown fox", "東京"]


@pytest.fixture(scope="module")
def generator(tiny_build):
    return Generator.load(tiny_build)


def test_sampling_filters_equal_transformers_logits_processors():
    rng = np.random.default_rng(0)
    for _ in range(100):
        logits = (rng.normal(size=64) * 3).astype(np.float32)
        history = rng.integers(0, 64, size=12)
        params = SamplingParams(temperature=float(rng.uniform(0.3, 2.0)), top_k=int(rng.integers(0, 20)),
                                top_p=float(rng.uniform(0.05, 1.0)), repetition_penalty=float(rng.uniform(0.8, 1.6)))
        ours = Sampler(params).process(logits, history)
        ids, scores = torch.tensor(history)[None], torch.tensor(logits)[None]
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
        scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
        if params.top_k:
            scores = TopKLogitsWarper(params.top_k)(ids, scores)
        expected = TopPLogitsWarper(params.top_p)(ids, scores)[0].numpy()
        kept = np.isfinite(expected)
        assert np.array_equal(np.isfinite(ours), kept)
        np.testing.assert_allclose(ours[kept], expected[kept], rtol=1e-5, atol=1e-5)


def test_sampling_follows_the_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.2, 1e-9], np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3))
    draws = np.bincount([sampler(logits, np.array([], np.int64)) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.2, 0.0], atol=0.03)


def test_greedy_with_repetition_penalty_equals_transformers_generate(tiny_checkpoint, generator):
    hf = transformers.PersimmonForCausalLM.from_pretrained(tiny_checkpoint).eval()
    prompt = PROMPTS[1]
    ids = generator.tokenizer.encode(prompt)
    ours = generator.generate(prompt, max_new_tokens=30, repetition_penalty=1.5, ignore_eos=True)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, repetition_penalty=1.5,
                               eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ours.token_ids == expected


def test_seed_makes_sampling_reproducible(generator):
    settings = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, ignore_eos=True)
    first = generator.generate(PROMPTS, seed=7, **settings)
    again = generator.generate(PROMPTS, seed=7, **settings)
    other = generator.generate(PROMPTS, seed=8, **settings)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_top_k_1_and_tiny_top_p_are_greedy(generator):
    greedy = generator.generate(PROMPTS[0], max_new_tokens=15, ignore_eos=True).token_ids
    assert generator.generate(PROMPTS[0], max_new_tokens=15, temperature=1.5, top_k=1, seed=1,
                              ignore_eos=True).token_ids == greedy
    assert generator.generate(PROMPTS[0], max_new_tokens=15, temperature=1.5, top_p=1e-6, seed=1,
                              ignore_eos=True).token_ids == greedy


def test_batches_larger_than_max_batch_match_one_by_one(generator):
    batch = generator.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)  # max_batch is 2: two chunks
    alone = [generator.generate(p, max_new_tokens=12, ignore_eos=True) for p in PROMPTS]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 12 for c in batch)
    assert [c.prompt_tokens for c in batch] == [len(generator.tokenizer.encode(p)) for p in PROMPTS]


def test_stream_pieces_join_to_the_generated_text(generator):
    settings = dict(max_new_tokens=25, temperature=0.9, seed=11, ignore_eos=True)
    pieces = list(generator.stream(PROMPTS[0], **settings))
    completion = generator.generate(PROMPTS[0], **settings)
    assert "".join(pieces) == completion.text
    assert completion.text == generator.tokenizer.decode(completion.token_ids)
    assert len(pieces) > 1


def test_stream_batch_interleaves_rows(generator):
    texts = {0: "", 1: ""}
    for row, piece in generator.stream_batch(PROMPTS[:2], max_new_tokens=10, ignore_eos=True):
        texts[row] += piece
    expected = generator.generate(PROMPTS[:2], max_new_tokens=10, ignore_eos=True)
    assert [texts[0], texts[1]] == [c.text for c in expected]


def test_stop_strings_cut_the_text_and_are_never_streamed(generator):
    full = generator.generate(PROMPTS[1], max_new_tokens=40, ignore_eos=True).text
    visible = full.lstrip()
    stop = visible[len(visible) // 2:len(visible) // 2 + 2]
    assert len(stop) == 2, full
    cut = full[:full.find(stop)]
    completion = generator.generate(PROMPTS[1], max_new_tokens=40, ignore_eos=True, stop=[stop, "never-there"])
    assert completion.finish_reason == "stop" and completion.text == cut
    assert "".join(generator.stream(PROMPTS[1], max_new_tokens=40, ignore_eos=True, stop=stop)) == cut


def test_eos_ends_a_row(tiny_build):
    generator = Generator.load(tiny_build)
    tokens = generator.generate(PROMPTS[2], max_new_tokens=10, ignore_eos=True).token_ids
    generator.manifest.eos_token_ids = [tokens[4]]
    completion = generator.generate(PROMPTS[2], max_new_tokens=10)
    first = tokens.index(tokens[4])
    assert completion.finish_reason == "eos" and completion.token_ids == tokens[:first]


def test_chat_uses_the_persimmon_format(generator):
    messages = ["Hi there", "Hello!", "What is 2+2?"]
    assert generator.chat(messages, max_new_tokens=8).token_ids == \
        generator.generate(format_chat(messages), max_new_tokens=8).token_ids
    assert "".join(generator.chat("Hi", stream=True, max_new_tokens=8)) == generator.chat("Hi", max_new_tokens=8).text


@pytest.mark.parametrize("call,message", [
    (lambda g: g.generate([]), "the batch is empty"),
    (lambda g: g.generate("x" * 400, max_new_tokens=10), r"exceeds the build's kv_capacity 96"),
    (lambda g: g.generate("hi", max_new_tokens=0), r"max_new_tokens=0: must be an integer >= 1"),
    (lambda g: g.generate("hi", temperature=-1), r"temperature=-1"),
    (lambda g: g.generate("hi", top_p=0), r"top_p=0: must be in \(0, 1\]"),
    (lambda g: g.generate("hi", top_k=-2), r"top_k=-2"),
    (lambda g: g.generate("hi", repetition_penalty=0), r"repetition_penalty=0"),
    (lambda g: g.generate("hi", stop=[""]), r"stop=\[''\]"),
    (lambda g: g.generate(["ok", 5], max_new_tokens=4), r"prompt 1 is a int"),
    (lambda g: g.generate("hi", bogus=1), r"bogus"),
    (lambda g: g.stream("x" * 400, max_new_tokens=10), r"exceeds the build's kv_capacity"),  # raised at the call
    (lambda g: g.stream(["a"]), r"stream\(\) takes one prompt"),
])
def test_invalid_requests_fail_before_any_compute(tiny_build, call, message):
    generator = Generator.load(tiny_build)
    with pytest.raises((PersimmonError, TypeError), match=message):
        call(generator)
    assert generator.backend.batch == 0  # the backend never started


def test_persimmon_run_streams_and_reports_errors(tiny_build, generator):
    exe = os.path.join(os.path.dirname(sys.executable), "persimmon-run")
    result = subprocess.run([exe, tiny_build, "hi", "--chat", "--max-new-tokens", "12", "--ignore-eos"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == generator.chat("hi", max_new_tokens=12, ignore_eos=True).text + "\n"
    bad = subprocess.run([exe, tiny_build, "hi", "--top-p", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "persimmon-run: error: top_p=2.0: must be in (0, 1] (1 = off)"


def test_runtime_generates_without_torch(tiny_build, generator):
    result = run_without_torch(f"""
        from persimmon_runtime.generator import Generator
        print(Generator.load({tiny_build!r}).generate("hi", max_new_tokens=6, ignore_eos=True).token_ids)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(generator.generate("hi", max_new_tokens=6, ignore_eos=True).token_ids)
