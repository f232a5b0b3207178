"""Continuous batching (runtime/persimmon_runtime/scheduler.py) on the real onnxruntime backend:
a request's completion does not depend on what shares its steps, rows are reused, prefill is
chunked without changing the logits, and failures stay with the request that caused them."""

import random
import time

import numpy as np
import pytest
from conftest import run_together

from persimmon_export.build import build
from persimmon_export.options import BuildOptions
from persimmon_runtime import PersimmonError
from persimmon_runtime.generator import Generator

PROMPTS = ["human: hi\n\nadept:", "The quick brown fox jumps over the lazy dog", "東京", "1 2 3 4 5 6 7 8 9",
           "a much longer prompt " * 6]
SETTINGS = [dict(max_new_tokens=12), dict(max_new_tokens=20, temperature=0.9, seed=1),
            dict(max_new_tokens=9, repetition_penalty=1.3), dict(max_new_tokens=16, temperature=1.2, top_k=30,
                                                                 top_p=0.9, seed=5),
            dict(max_new_tokens=25, temperature=0.7, seed=2, stop=["zz"])]
MAX_BATCH = 4


@pytest.fixture(scope="module")
def build_dir(tiny_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sched") / "b")
    build(tiny_checkpoint, out, BuildOptions(dtype="float32", max_batch=MAX_BATCH, kv_capacity=160,
                                             backend="onnxruntime"))
    return out


@pytest.fixture(scope="module")
def solo(build_dir):
    """Each (prompt, settings) pair's completion with nothing else running."""
    generator = Generator.load(build_dir)
    return {(p, i): generator.generate(p, ignore_eos=True, **s) for p in PROMPTS for i, s in enumerate(SETTINGS)}


def _recording(generator):
    """Record (first_row, rows, new tokens per row) of every backend step."""
    steps, real_step = [], generator.backend.step
    generator.backend.step = lambda ids, *rest: steps.append((rest[-1], *ids.shape)) or real_step(ids, *rest)
    return steps


def test_completions_do_not_depend_on_what_shares_the_batch(build_dir, solo):
    """Threads submit 25 requests of mixed settings in random orders to a 4-row build: every
    completion (greedy and sampled, seeded) equals its solo one; rows were shared and reused."""
    generator = Generator.load(build_dir)
    requests_per_step = []
    generator.scheduler.on_step = requests_per_step.append
    pairs = [(p, i) for p in PROMPTS for i in range(len(SETTINGS))]
    results = {}

    def worker(seed):
        for pair in random.Random(seed).sample(pairs, len(pairs)):
            prompt, index = pair
            if seed % 2:
                results[seed, pair] = generator.generate(prompt, ignore_eos=True, **SETTINGS[index]).token_ids
            else:
                results[seed, pair] = "".join(generator.stream(prompt, ignore_eos=True, **SETTINGS[index]))

    errors = run_together(worker, 3)
    assert not errors and len(results) == 3 * len(pairs)
    assert all(got in (solo[pair].token_ids, solo[pair].text) for (_, pair), got in results.items())
    assert max(requests_per_step) > 1  # requests did share steps


def test_a_batch_bigger_than_the_build_queues_and_reuses_rows(build_dir, solo):
    generator = Generator.load(build_dir)
    steps = _recording(generator)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(11)]
    completions = generator.generate(prompts, ignore_eos=True, **SETTINGS[2])  # greedy: a seed's stream
    assert [c.token_ids for c in completions] == [solo[p, 2].token_ids for p in prompts]  # is per prompt index
    assert max(first + rows for first, rows, _ in steps) == MAX_BATCH  # never more rows than the build has


def test_prefill_runs_on_the_newcomers_rows_alone(build_dir, solo):
    """A request arriving while another decodes (submitted from inside the first one's third step,
    so deterministically) is prefilled in a step over its own row: the decoding row does not
    compute the prompt's padding."""
    generator = Generator.load(build_dir)
    steps = _recording(generator)
    newcomer = []

    def on_step(requests):
        if len(steps) == 3:
            newcomer.append(generator.scheduler.submit(generator._prepare([PROMPTS[4]], _params(**SETTINGS[2]))))

    generator.scheduler.on_step = on_step
    first = generator.scheduler.submit(generator._prepare([PROMPTS[0]], _params(**SETTINGS[0])))
    list(first.events())
    list(newcomer[0].events())
    assert first.sequences[0].token_ids == solo[PROMPTS[0], 0].token_ids
    assert newcomer[0].sequences[0].token_ids == solo[PROMPTS[4], 2].token_ids
    prompt_tokens = len(newcomer[0].sequences[0].prompt_ids)
    assert steps[3] == (1, 1, prompt_tokens)  # row 1, alone, the whole prompt (shorter than a chunk)
    assert steps[4] == (0, 2, 1)  # then both rows decode together
    assert all(rows <= 2 and (seq == 1 or rows == 1) for _, rows, seq in steps)


@pytest.fixture(scope="module")
def long_build(tiny_checkpoint, tmp_path_factory):
    """Room for 500-token prompts: chunks cross slot 256, where `whole`-layout caches used to grow."""
    out = str(tmp_path_factory.mktemp("long") / "b")
    build(tiny_checkpoint, out, BuildOptions(dtype="float32", max_batch=2, kv_capacity=512, backend="onnxruntime"))
    return out


def test_chunked_prefill_gives_the_one_step_logits(long_build):
    """Each chunk writes at its row's next slot and attends to what the earlier chunks cached, also
    across slot 256: the last logits, and the next decode step's, match one-step prefill
    within 1e-5 (fp32)."""
    generator = Generator.load(long_build)
    backend = generator.backend
    prompt = np.random.default_rng(0).integers(3, generator.manifest.model.vocab_size, 500)

    def run(chunk):
        backend.start(2)
        for start in range(0, len(prompt), chunk):
            piece = prompt[start:start + chunk]
            logits = backend.step(piece[None], np.array([start]), np.array([len(piece)]),
                                  np.ones((1, start + len(piece)), np.int64), 1)  # on row 1
        decoded = backend.step(np.array([[7]]), np.array([len(prompt)]), np.array([1]),
                               np.ones((1, len(prompt) + 1), np.int64), 1)
        return logits[0], decoded[0]

    whole = run(len(prompt))
    for chunk in (1, 7, 100, 256):
        for got, expected in zip(run(chunk), whole):
            assert np.abs(got - expected).max() <= 1e-5, chunk


def test_a_step_on_some_rows_leaves_the_others_alone(build_dir):
    generator = Generator.load(build_dir)
    backend = generator.backend
    ids = np.array([[5, 6, 7, 8]] * 3)
    backend.start(3)
    backend.step(ids, np.zeros(3, np.int64), np.full(3, 4), np.ones((3, 4), np.int64))
    backend.step(np.array([[9, 9, 9, 9]]), np.zeros(1, np.int64), np.array([4]), np.ones((1, 4), np.int64), 1)
    after = backend.step(np.array([[11]] * 3), np.full(3, 4), np.ones(3, np.int64), np.ones((3, 5), np.int64))
    assert np.array_equal(after[0], after[2]) and not np.array_equal(after[0], after[1])  # only row 1 changed
    with pytest.raises(PersimmonError, match=r"input_ids has shape \(2, 1\); the backend was started for 3 rows: "
                                             r"expected \(1..1, seq >= 1\) from row 2"):
        backend.step(np.array([[1], [1]]), np.zeros(2, np.int64), np.ones(2, np.int64), np.ones((2, 1), np.int64), 2)
    for bad in (3, -1, True, 1.0):
        with pytest.raises(PersimmonError, match=f"first_row {bad!r} is not a row of the 3"):
            backend.step(np.array([[1]]), np.zeros(1, np.int64), np.ones(1, np.int64), np.ones((1, 1), np.int64), bad)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_generation_with_small_prefill_chunks_is_unchanged(build_dir, solo, chunk):
    generator = Generator.load(build_dir, prefill_chunk=chunk)
    steps = _recording(generator)
    for index in (0, 3):
        completion = generator.generate(PROMPTS[4], ignore_eos=True, **SETTINGS[index])
        assert completion.token_ids == solo[PROMPTS[4], index].token_ids
    assert max(seq for _, _, seq in steps) <= chunk


@pytest.mark.parametrize("chunk", [0, -4, 2.5, True, "8", None])
def test_bad_prefill_chunks_are_one_line(build_dir, chunk):
    with pytest.raises(PersimmonError, match=r"^prefill_chunk=.* must be an integer >= 1 \(tokens per prefill step\)$"):
        Generator.load(build_dir, prefill_chunk=chunk)


def test_a_cancelled_request_leaves_its_row_at_the_next_step(build_dir, solo):
    """Cancelled from inside its third step (deterministically): that step's token is dropped, no
    later step computes its row, and the request ends with finish_reason "cancelled"."""
    generator = Generator.load(build_dir)
    steps = _recording(generator)
    seen = []
    doomed = None

    def on_step(requests):
        seen.append(requests)
        if len(seen) == 3:
            doomed.cancel()

    generator.scheduler.on_step = on_step
    doomed = generator.scheduler.submit(generator._prepare([PROMPTS[0]], _params(max_new_tokens=100)))
    list(doomed.events())  # its pieces, then the end
    assert doomed.sequences[0].finish_reason == "cancelled"
    assert len(steps) == 3 and len(doomed.sequences[0].token_ids) == 2  # prefill, 2 decode steps
    assert generator.generate(PROMPTS[1], ignore_eos=True, **SETTINGS[1]).token_ids == solo[PROMPTS[1], 1].token_ids
    assert not any(generator.scheduler.rows)


def _params(**settings):
    from persimmon_runtime.sampling import SamplingParams

    return SamplingParams(ignore_eos=True, **settings)


class BrokenStep(Exception):
    pass


def test_a_failing_step_fails_its_requests_and_the_next_ones_run(build_dir, solo):
    generator = Generator.load(build_dir)
    real_step, calls = generator.backend.step, []

    def step(*args):
        calls.append(1)
        if len(calls) == 4:
            raise BrokenStep("device lost")
        return real_step(*args)

    generator.backend.step = step
    with pytest.raises(PersimmonError, match=r"^the model step failed: BrokenStep: device lost$"):
        generator.generate(PROMPTS[:2], ignore_eos=True, **SETTINGS[0])
    # the backend restarted with zeroed caches: later requests are exact
    assert generator.generate(PROMPTS[2], ignore_eos=True, **SETTINGS[3]).token_ids == solo[PROMPTS[2], 3].token_ids


def test_close_cancels_everything_and_waits_for_the_worker(build_dir, solo):
    generator = Generator.load(build_dir)
    steps = _recording(generator)
    scheduler = generator.scheduler
    running = [scheduler.submit(generator._prepare([PROMPTS[i % 4]], _params(max_new_tokens=130)))
               for i in range(MAX_BATCH)]
    waiting = scheduler.submit(generator._prepare([PROMPTS[0]], _params(max_new_tokens=5)))  # no row is free
    deadline = time.monotonic() + 60
    while len(steps) < 3 and time.monotonic() < deadline:  # the rows are decoding
        time.sleep(0.001)
    generator.close(timeout=60)
    assert scheduler._worker is None and not any(scheduler.rows)
    for request in [*running, waiting]:
        list(request.events())  # what it produced, then the end
        assert request.sequences[0].finish_reason == "cancelled"
    assert waiting.sequences[0].token_ids == []
    # usable again afterwards
    assert generator.generate(PROMPTS[2], ignore_eos=True, **SETTINGS[3]).token_ids == solo[PROMPTS[2], 3].token_ids
