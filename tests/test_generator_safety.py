"""Hostile and careless use of the runtime: NaN/inf logits, threads and interleaved streams,
stop lists, extreme sampling settings, lone surrogates and damaged tokenizer files.
Each must give correct output or one PersimmonError line, never garbage or a foreign exception."""

import hashlib
import itertools
import json
import os
import random
import shutil
import threading

import numpy as np
import onnx
import pytest
from conftest import TRICKY_TEXTS, run_together
from test_generator import generator  # noqa: F401 (a fixture: the Generator of conftest's tiny_build)

from persimmon_export.build import build
from persimmon_export.options import BuildOptions
from persimmon_runtime import PersimmonError, Tokenizer, format_chat
from persimmon_runtime.generator import Generator
from persimmon_runtime.sampling import MAX_STOP_CHARS, MAX_STOPS, Sampler, SamplingParams
from persimmon_runtime.scheduler import Request, Sequence

PROMPTS = ["human: hi\n\nadept:", "The quick brown fox", "東京", "a b c d e f", "Hello world, this is"]


@pytest.fixture(autouse=True)
def private_verify_records(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSIMMON_CACHE_DIR", str(tmp_path / "verify-records"))


# ---- NaN/inf logits ----

def _poisoned_copy(build_dir, dest, tensor, value):
    """A copy of the build with every element of `tensor` set to `value`, the manifest's checksums
    updated to match (as if the weights were bad at the source), so loading succeeds."""
    shutil.copytree(build_dir, dest)
    model = onnx.load(os.path.join(dest, "model.onnx"), load_external_data=False)
    init = next(t for t in model.graph.initializer if t.name == tensor)
    where = {e.key: e.value for e in init.external_data}
    dtype = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}[init.data_type]
    data_file = os.path.join(dest, where["location"])
    with open(data_file, "r+b") as f:
        f.seek(int(where["offset"]))
        f.write(np.full(int(where["length"]) // np.dtype(dtype).itemsize, value, dtype).tobytes())
    manifest_file = os.path.join(dest, "manifest.json")
    manifest = json.load(open(manifest_file))
    manifest["files"][where["location"]]["sha256"] = hashlib.sha256(open(data_file, "rb").read()).hexdigest()
    json.dump(manifest, open(manifest_file, "w"))
    return str(dest)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_corrupt_weights_give_one_error_line_not_token_0(tiny_build, tmp_path, value):
    generator = Generator.load(_poisoned_copy(tiny_build, tmp_path / "bad", "model.final_layernorm.weight", value))
    settings_tried = ({}, {"temperature": 0.8, "seed": 1}, {"repetition_penalty": 1.3},
                      {"temperature": 1.0, "top_p": 0.5})
    for settings in settings_tried:
        with pytest.raises(PersimmonError, match=r"NaN/inf logits for prompt 0 at generated token 0.*corrupt weights") \
                as caught:
            generator.generate(PROMPTS[0], max_new_tokens=5, **settings)
        assert "\n" not in str(caught.value)
        with pytest.raises(PersimmonError, match="NaN/inf logits"):
            list(generator.stream(PROMPTS[1], max_new_tokens=5, **settings))


def test_float16_overflow_is_named_with_the_float32_remedy(tiny_checkpoint, tiny_build, tmp_path):
    build(tiny_checkpoint, str(tmp_path / "b16"), BuildOptions(dtype="float16", max_batch=1, kv_capacity=32,
                                                               backend="onnxruntime"))
    # A large but finite LayerNorm weight: the activations it scales pass float16's 65504 and
    # overflow to inf (then inf - inf = NaN downstream); in float32 the same weights are fine.
    tensor = "model.layers.0.input_layernorm.weight"
    hot16 = _poisoned_copy(str(tmp_path / "b16"), tmp_path / "hot16", tensor, 60000.0)
    with pytest.raises(PersimmonError, match=r"float16 overflow.*--dtype float32.*persimmon-export parity"):
        Generator.load(hot16).generate("hi", max_new_tokens=3)
    hot32 = _poisoned_copy(tiny_build, tmp_path / "hot32", tensor, 60000.0)
    assert len(Generator.load(hot32).generate("hi", max_new_tokens=3, ignore_eos=True).token_ids) == 3


class FaultyBackend:
    """A test double for the backend only: the real onnxruntime backend, except that at model step
    `at` (0 = prefill) one logit of `row` becomes `value`. The generator under test is real."""

    def __init__(self, real, value, row, at):
        self.real, self.value, self.row, self.at = real, value, row, at
        self.manifest, self.name, self.max_step_tokens = real.manifest, real.name, real.max_step_tokens

    def start(self, batch):
        self.steps = 0
        self.real.start(batch)

    def step(self, *inputs):
        logits = self.real.step(*inputs)
        if self.steps == self.at:
            logits[self.row, 7] = self.value
        self.steps += 1
        return logits


def _faulty(build_dir, value, row, at):
    clean = Generator.load(build_dir)
    return Generator(FaultyBackend(clean.backend, value, row, at), clean.tokenizer)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("row,at", [(0, 0), (1, 0), (1, 3), (0, 5)])
def test_a_non_finite_logit_in_any_row_at_any_step_is_caught(tiny_build, value, row, at):
    for settings in ({}, {"temperature": 0.7, "top_k": 20, "seed": 3}):
        generator = _faulty(tiny_build, value, row, at)  # counts steps from its first request
        with pytest.raises(PersimmonError, match=rf"NaN/inf logits for prompt {row} at generated token {at}"):
            generator.generate(PROMPTS[:2], max_new_tokens=8, ignore_eos=True, **settings)


def test_a_failed_stream_hands_out_only_good_text_and_frees_the_generator(tiny_build, generator):
    faulty = _faulty(tiny_build, float("nan"), 0, 6)
    expected = generator.generate(PROMPTS[1], max_new_tokens=12, ignore_eos=True)
    pieces = []
    with pytest.raises(PersimmonError, match="NaN/inf logits"):
        for piece in faulty.stream(PROMPTS[1], max_new_tokens=12, ignore_eos=True):
            pieces.append(piece)
    assert expected.text.startswith("".join(pieces))
    # the error released the generator: the next request runs (and hits the fault again at step 6 only)
    assert faulty.generate(PROMPTS[1], max_new_tokens=6, ignore_eos=True).token_ids == expected.token_ids[:6]


def test_finished_rows_leave_the_batch(tiny_build, generator):
    """A row that finished is not computed any more: the steps after its EOS cover the other row only."""
    alone = {p: generator.generate(p, max_new_tokens=10, ignore_eos=True).token_ids for p in PROMPTS}
    # a pair where the first row's k-th token can serve as its EOS without ending anything else
    first, second, k = next((a, b, k) for a in PROMPTS for b in PROMPTS if a != b for k in range(6)
                            if alone[a][k] not in alone[a][:k] + alone[b])
    clean = Generator.load(tiny_build)
    clean.manifest.eos_token_ids = [alone[first][k]]  # row 0 ends at step k
    steps = []
    real_step = clean.backend.step
    clean.backend.step = lambda ids, *rest: steps.append((rest[-1], len(ids))) or real_step(ids, *rest)
    result = clean.generate([first, second], max_new_tokens=10)
    assert [c.token_ids for c in result] == [alone[first][:k], alone[second]]
    assert [c.finish_reason for c in result] == ["eos", "length"]
    # (first_row, rows) per step: both rows through the step that sampled the EOS, then row 1 alone
    assert steps == [(0, 2)] * (k + 1) + [(1, 1)] * (10 - k - 1)


# ---- extreme sampling settings ----

@pytest.mark.parametrize("settings", [
    {"temperature": 1e-40}, {"temperature": 5e-324}, {"temperature": 1e-300, "top_p": 0.3},
    {"temperature": 1e-40, "top_k": 5}, {"repetition_penalty": 1e-40, "temperature": 1.0},
    {"repetition_penalty": 5e-324, "temperature": 1e-40}, {"repetition_penalty": 1e300, "temperature": 0.5},
    {"repetition_penalty": 1e-40}, {"repetition_penalty": 1e300}, {"temperature": 1e300},
    {"temperature": 1.7e308, "repetition_penalty": 1e-300},
])
def test_extreme_but_valid_settings_sample_valid_tokens(settings):
    rng = np.random.default_rng(0)
    largest = np.finfo(np.float32).max
    for scale in (1.0, 1e3, 1e30, largest):
        logits = np.clip(rng.normal(size=500) * scale, -largest, largest).astype(np.float32)
        history = rng.integers(0, 500, size=40)
        sampler = Sampler(SamplingParams(seed=2, **settings))
        token = sampler(logits, history)
        assert 0 <= token < 500
        processed = sampler.process(logits, history)
        assert not np.isnan(processed).any() and np.isfinite(processed.max())


def test_a_tiny_temperature_is_greedy():
    rng = np.random.default_rng(1)
    for _ in range(50):
        logits = rng.normal(size=300).astype(np.float32)
        history = rng.integers(0, 300, size=10)
        for penalty in (1.0, 1.5, 1e-40):
            greedy = Sampler(SamplingParams(repetition_penalty=penalty))(logits, history)
            for temperature in (1e-40, 1e-200, 5e-324):
                sampler = Sampler(SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=9))
                assert sampler(logits, history) == greedy


def test_a_tiny_repetition_penalty_strongly_prefers_seen_tokens():
    logits = np.array([5.0, 3.0, 1.0, -2.0, 8.0], np.float32)
    sampler = Sampler(SamplingParams(repetition_penalty=1e-40, temperature=1.0, seed=0))
    draws = {sampler(logits, np.array([0, 1])) for _ in range(200)}
    assert draws == {0}  # 5e40 beats 3e40 by e^(2e40): the other seen token never comes up
    assert Sampler(SamplingParams(repetition_penalty=1e-40))(logits, np.array([1, 3])) == 1


def test_extreme_settings_through_the_generator(generator):
    greedy = generator.generate(PROMPTS[1], max_new_tokens=10, ignore_eos=True).token_ids
    assert generator.generate(PROMPTS[1], max_new_tokens=10, ignore_eos=True, temperature=1e-40).token_ids == greedy
    for settings in ({"repetition_penalty": 1e-40, "temperature": 1.0}, {"repetition_penalty": 1e-40}):
        result = generator.generate(PROMPTS[1], max_new_tokens=10, ignore_eos=True, seed=4, **settings)
        assert len(result.token_ids) == 10


@pytest.mark.parametrize("settings,message", [
    ({"temperature": float("nan")}, r"^temperature=nan: must be a finite number >= 0"),
    ({"temperature": float("inf")}, r"^temperature=inf"),
    ({"temperature": -1e-40}, r"^temperature=-1e-40"),
    ({"temperature": "0.7"}, r"^temperature='0.7'"),
    ({"temperature": True}, r"^temperature=True"),
    ({"temperature": 10 ** 400}, r"^temperature=1000.*\.\.\.: must be a finite"),
    ({"temperature": 1j}, r"^temperature=1j"),
    ({"repetition_penalty": float("nan")}, r"^repetition_penalty=nan"),
    ({"repetition_penalty": float("inf")}, r"^repetition_penalty=inf"),
    ({"repetition_penalty": -1.0}, r"^repetition_penalty=-1.0"),
    ({"repetition_penalty": 0.0}, r"^repetition_penalty=0.0"),
    ({"repetition_penalty": None}, r"^repetition_penalty=None"),
    ({"top_p": float("nan")}, r"^top_p=nan"),
    ({"top_p": 1.0000001}, r"^top_p=1.0000001"),
    ({"top_k": 2.5}, r"^top_k=2.5"),
    ({"top_k": False}, r"^top_k=False"),
    ({"max_new_tokens": 3.0}, r"^max_new_tokens=3.0"),
    ({"max_new_tokens": "5"}, r"^max_new_tokens='5'"),
    ({"seed": -3}, r"^seed=-3"),
    ({"seed": 1.5}, r"^seed=1.5"),
    ({"ignore_eos": "yes"}, r"^ignore_eos='yes'"),
    ({"stop": 123}, r"^stop=123: must be a non-empty string or a list of them"),
    ({"stop": b"\n"}, r"^stop=b'\\n'"),
    ({"stop": ["ok", 5]}, r"^stop=\['ok', 5\]"),
    ({"stop": ["ok", None]}, r"^stop=\['ok', None\]"),
    ({"stop": {"a", "b"}}, r"^stop=\{"),
    ({"stop": [["nested"]]}, r"^stop=\[\['nested'\]\]"),
    ({"stop": ["a", ""]}, r"^stop=\['a', ''\]"),
    ({"stop": ["s"] * (MAX_STOPS + 1)}, rf"^stop has {MAX_STOPS + 1} strings; at most {MAX_STOPS} are allowed$"),
    ({"stop": ["x" * (MAX_STOP_CHARS + 1)]}, rf"has {MAX_STOP_CHARS + 1} characters; at most {MAX_STOP_CHARS}"),
    ({"bogus": 1}, r"^unknown sampling setting 'bogus'; known: max_new_tokens, "),
    ({"Temperature": 0.5}, r"^unknown sampling setting 'Temperature'"),
])
def test_bad_settings_are_one_line_before_any_compute(tiny_build, settings, message):
    generator = Generator.load(tiny_build)
    for call in (lambda: generator.generate("hi", **settings), lambda: generator.stream("hi", **settings),
                 lambda: generator.stream_batch(["hi"], **settings), lambda: generator.chat("hi", **settings)):
        with pytest.raises(PersimmonError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
    assert generator.backend.batch == 0  # never started


def test_ten_thousand_stops_are_refused_in_one_short_line(generator):
    with pytest.raises(PersimmonError, match=r"^stop has 10000 strings; at most 16 are allowed$"):
        generator.generate("hi", stop=[f"stop{i}" for i in range(10000)])


def test_valid_settings_of_other_numeric_types_work(generator):
    expected = generator.generate("hi", max_new_tokens=6, temperature=0.5, top_k=8, seed=3).token_ids
    same = generator.generate("hi", max_new_tokens=np.int32(6), temperature=np.float32(0.5), top_k=np.int64(8),
                              seed=np.uint8(3), stop=None)
    assert same.token_ids == expected


# ---- stop strings: correct and cheap ----

def _reference(pieces, stops):
    """Naive truth: the text up to the earliest stop found once the piece completing it arrives."""
    text = ""
    for piece in pieces:
        text += piece
        found = [text.find(s) for s in stops if s in text]
        if found:
            return text[:min(found)], "stop"
    return text, None


def _longest_held(text, stops):
    return max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)


def test_stop_matching_equals_the_naive_search_for_any_split():
    rng = random.Random(0)
    for _ in range(400):
        stops = tuple({"".join(rng.choice("ab\n") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 5))})
        text = "".join(rng.choice("ab\nc") for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 12))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        sequence = Sequence(0, [], SamplingParams(stop=stops), None, None, frozenset())
        emitted, seen = "", ""
        for piece in pieces:
            emitted += sequence.add_text(piece)
            seen += piece
            if sequence.finish_reason:
                break
            # what is withheld is exactly the longest tail that could still become a stop
            assert emitted == seen[:len(seen) - _longest_held(seen, stops)]
        if not sequence.finish_reason:
            emitted += sequence.add_text("", final=True)
        assert (emitted, sequence.finish_reason) == _reference(pieces, stops)


def test_max_stops_of_max_length_stream_correctly(generator):
    full = generator.generate(PROMPTS[3], max_new_tokens=40, ignore_eos=True).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    stops = [("z" * (MAX_STOP_CHARS - 1)) + str(i % 10) for i in range(MAX_STOPS - 1)] + [stop]
    completion = generator.generate(PROMPTS[3], max_new_tokens=40, ignore_eos=True, stop=stops)
    assert completion.finish_reason == "stop" and completion.text == full[:full.find(stop)]
    assert "".join(generator.stream(PROMPTS[3], max_new_tokens=40, ignore_eos=True, stop=stops)) == completion.text


# ---- concurrency ----

REQUESTS = [
    (PROMPTS[0], dict(max_new_tokens=12)),
    (PROMPTS[1], dict(max_new_tokens=15, temperature=0.9, seed=1)),
    (PROMPTS[2], dict(max_new_tokens=10, repetition_penalty=1.3)),
    (PROMPTS[3], dict(max_new_tokens=14, temperature=1.2, top_k=30, top_p=0.9, seed=5)),
    (PROMPTS[4], dict(max_new_tokens=9)),
    (PROMPTS[:3], dict(max_new_tokens=11, temperature=0.7, seed=2)),  # three prompts: two batches
]


def _answer(generator, prompts, settings, streamed):
    if streamed and isinstance(prompts, str):
        return "".join(generator.stream(prompts, ignore_eos=True, **settings))
    result = generator.generate(prompts, ignore_eos=True, **settings)
    return [c.text for c in result] if isinstance(result, list) else result.text


def test_threads_sharing_a_generator_get_the_single_threaded_answers(generator):
    expected = [_answer(generator, p, s, False) for p, s in REQUESTS]
    results = {}

    def worker(thread):
        for turn in range(3):
            for index in random.Random(thread * 10 + turn).sample(range(len(REQUESTS)), len(REQUESTS)):
                prompts, settings = REQUESTS[index]
                results[thread, turn, index] = _answer(generator, prompts, settings, streamed=(thread + turn) % 2)

    errors = run_together(worker, 4, timeout_s=120)
    assert not errors and len(results) == 4 * 3 * len(REQUESTS)
    assert all(text == expected[index] for (_, _, index), text in results.items())


def test_interleaved_streams_in_one_thread_each_get_their_solo_answer(generator):
    expected = {p: generator.generate(p, max_new_tokens=15, ignore_eos=True).text for p in PROMPTS[1:3]}
    first = generator.stream(PROMPTS[1], max_new_tokens=15, ignore_eos=True)
    second = generator.stream(PROMPTS[2], max_new_tokens=15, ignore_eos=True)
    pieces = {PROMPTS[1]: [next(first)], PROMPTS[2]: [next(second)]}
    # a whole request, and a batch beyond the free rows, while both streams are unfinished
    assert generator.generate(PROMPTS[2], max_new_tokens=15, ignore_eos=True).text == expected[PROMPTS[2]]
    assert [c.text for c in generator.generate(PROMPTS[1:3], max_new_tokens=15, ignore_eos=True)] == \
        [expected[PROMPTS[1]], expected[PROMPTS[2]]]
    for a, b in itertools.zip_longest(first, second):
        pieces[PROMPTS[1]].append(a or "")
        pieces[PROMPTS[2]].append(b or "")
    assert {p: "".join(v) for p, v in pieces.items()} == expected


def test_closing_or_dropping_a_stream_frees_its_row(generator):
    expected = generator.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True).text
    streams = [generator.stream(PROMPTS[1], max_new_tokens=80, ignore_eos=True) for _ in range(2)]
    for stream in streams:  # both rows of the build are taken
        next(stream)
    streams[0].close()
    for _ in generator.stream(PROMPTS[1], max_new_tokens=80, ignore_eos=True):
        break  # an abandoned iterator, collected and closed
    # a new request gets a freed row while the other stream still holds its own
    assert generator.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True).text == expected
    streams[1].close()


def test_should_stop_ends_the_stream_and_frees_the_row(generator):
    """The Triton model's cancellation and deadline rely on this, also while no text appears."""
    steps = []
    real_step = generator.backend.step
    generator.backend.step = lambda *args: steps.append(1) or real_step(*args)
    try:
        answers = iter([False, True])
        pieces = list(generator.stream(PROMPTS[1], max_new_tokens=80, ignore_eos=True,
                                       should_stop=lambda: next(answers)))
        assert len(pieces) <= 2  # asked after the first piece (False), then stops at the next ask
        # a request that sends nothing (still waiting for a row): should_stop is asked while waiting
        waiting = Request([])
        assert list(waiting.events(should_stop=lambda: True, poll_s=0.01)) == [] and waiting.cancelled
        assert generator.generate(PROMPTS[0], max_new_tokens=4).token_ids  # a row is free
        assert len(steps) < 2 * 80  # neither stream ran to its end
    finally:
        del generator.backend.step


def test_a_paused_stream_does_not_block_other_threads(generator):
    expected = {p: generator.generate(p, max_new_tokens=12, ignore_eos=True).text for p in PROMPTS[:2]}
    stream = generator.stream(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    pieces = [next(stream)]
    other = {}
    thread = threading.Thread(target=lambda: other.update(
        text=generator.generate(PROMPTS[1], max_new_tokens=12, ignore_eos=True).text))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive() and other["text"] == expected[PROMPTS[1]]
    pieces += list(stream)
    assert "".join(pieces) == expected[PROMPTS[0]]


# ---- prompts and tokenizer files ----

class CountingEncoder:
    """sentencepiece's processor, counting encode calls (everything else passes through)."""

    def __init__(self, sp):
        self.sp, self.calls = sp, 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.sp.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.sp, name)


def test_a_huge_prompt_is_refused_before_it_is_tokenized(generator, monkeypatch):
    """Tokenizing costs time and memory in the text's length (a 70 MB prompt: 22.7 s of CPU before
    its refusal): the text is bounded by the characters kv_capacity tokens can spell, first."""
    counting = CountingEncoder(generator.tokenizer.sp)
    monkeypatch.setattr(generator.tokenizer, "sp", counting)
    bound = generator.manifest.kv_capacity * generator.tokenizer.max_piece_chars
    with pytest.raises(PersimmonError, match=rf"^prompt 1 has {bound + 1:,} characters, more than "
                                             rf"{generator.manifest.kv_capacity} tokens can hold"):
        generator.generate(["fine", "x" * (bound + 1)], max_new_tokens=2)
    assert counting.calls == 1  # "fine" only: the long one was refused from its length
    with pytest.raises(PersimmonError, match="tokens; with max_new_tokens=2 that exceeds"):
        generator.generate("word " * (bound // 5), max_new_tokens=2)  # within the bound: tokenized, then refused


@pytest.mark.parametrize("prompt", ["\ud800", "abc\udfff", "東京\udc80x", "🎉\ud83c"])
def test_lone_surrogates_in_prompts_are_one_line(generator, prompt):
    for call in (lambda: generator.generate(prompt, max_new_tokens=8), lambda: generator.stream(prompt),
                 lambda: generator.chat(prompt), lambda: generator.generate(["fine", prompt], max_new_tokens=8)):
        with pytest.raises(PersimmonError, match=r"prompt \d: text has a lone surrogate U\+D[89A-F][0-9A-F]{2} at "
                                                 r"character \d+, which is not valid Unicode"):
            call()
    with pytest.raises(PersimmonError, match="lone surrogate"):
        generator.tokenizer.encode(prompt)


@pytest.mark.parametrize("messages,message", [
    (5, "messages must be a str or a list of turns, got int"),
    (None, "got NoneType"),
    ({"role": "user", "content": "hi"}, "got dict"),
    ([{"role": ["user"], "content": "hi"}], r"turn 0 has role \['user'\]; use one of human, user, adept, assistant"),
    ([{"content": "hi"}], "turn 0 has role None"),
    ([{"role": "system", "content": "hi"}], "the conversation has no human turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "turn 1 has role 'system'; turns must"),
    ([{"role": "user", "content": 3}], "turn 0 content must be a str, got int"),
    (["hi", {"role": "human", "content": "x"}], "turn 1 has role 'human'; turns must alternate"),
    ([["nested"]], "turn 0 content must be a str, got list"),
])
def test_bad_conversations_are_one_line(messages, message):
    with pytest.raises(PersimmonError, match=message):
        format_chat(messages)


def _tokenizer_dir(tmp_path, sp_model, config):
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    text = config if isinstance(config, bytes) else json.dumps(config).encode()
    (tmp_path / "tokenizer_config.json").write_bytes(text)
    return str(tmp_path)


@pytest.mark.parametrize("config,message", [
    ({"bos_token": 7}, r"tokenizer_config.json: bos_token=7 must be a string"),
    ({"bos_token": {"content": 7}}, r"bos_token=\{'content': 7\} must be a string"),
    ({"bos_token": ["|ENDOFTEXT|"]}, r"bos_token=\['\|ENDOFTEXT\|'\]"),
    ({"eos_token": True}, r"eos_token=True must be a string"),
    ({"add_bos_token": "yes"}, r"add_bos_token='yes' must be true or false"),
    ({"add_bos_token": 1}, r"add_bos_token=1"),
    ([1, 2], r"tokenizer_config.json: must hold a JSON object, not list"),
    ("just a string", r"must hold a JSON object, not str"),
    (b"\xff\xfe{}", r"tokenizer_config.json: cannot read it as JSON \(UnicodeDecodeError"),
    (b'{"bos_token": ', r"cannot read it as JSON \(JSONDecodeError"),
])
def test_bad_tokenizer_config_is_one_line_naming_the_file(tmp_path, sp_model, config, message):
    with pytest.raises(PersimmonError, match=message):
        Tokenizer.from_dir(_tokenizer_dir(tmp_path, sp_model, config))


def test_bad_token_arguments_are_one_line(sp_model):
    for kwargs, message in [({"bos_token": 7}, "bos_token=7 must be a string"),
                            ({"eos_token": b"x"}, "eos_token=b'x' must be a string"),
                            ({"add_bos": "no"}, "add_bos='no' must be true or false")]:
        with pytest.raises(PersimmonError, match=message):
            Tokenizer(sp_model, **kwargs)


def _exercise(tokenizer):
    """Everything generation asks of a tokenizer, on every piece it has."""
    for text in TRICKY_TEXTS[::2]:
        tokenizer.decode(tokenizer.encode(text))
    tokenizer.decode(range(tokenizer.vocab_size))


def test_damaged_tokenizer_model_loads_and_works_or_is_one_line(tmp_path, sp_model):
    """Flip one byte (500 random positions, two masks) or truncate: never a foreign exception.
    (A same-size flip that still parses is caught by the build's checksums, not here.)"""
    data = open(sp_model, "rb").read()
    damaged = str(tmp_path / "tokenizer.model")
    variants = [data[:n] for n in range(0, len(data), 97)]
    variants += [data[:i] + bytes([data[i] ^ mask]) + data[i + 1:]
                 for i in random.Random(0).sample(range(len(data)), 500) for mask in (1, 0x80)]
    refused = 0
    for variant in variants:
        with open(damaged, "wb") as f:
            f.write(variant)
        try:
            tokenizer = Tokenizer(damaged)
        except PersimmonError as e:
            assert str(e).startswith(f"{damaged}: not a sentencepiece model, or a damaged one") and "\n" not in str(e)
            refused += 1
            continue
        _exercise(tokenizer)
    assert refused > len(variants) // 3
