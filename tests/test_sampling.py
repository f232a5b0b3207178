"""sample(): the batched next-token choice, against transformers' logits processors, at Persimmon's
vocabulary (262,144) and at small ones."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from persimmon_runtime import PersimmonError
from persimmon_runtime.sampling import Sampler, SamplingParams, sample

VOCAB = 262_144

# Our top-p works on float32 probabilities (measured on 20 vocab-262,144 rows: the normalised
# cumulative mass within 1.4e-8 of float64's), transformers here on float64 scores. Where top_p lies
# within this relative distance (7x that) of a cut, rounding decides it, not the rule: such a
# random case is skipped, and a chosen one must not be one.
ROUNDING_MARGIN = 1e-7


def row_of(kind: str, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """float32 logits of a named shape: flat (normal * 3), peaked (a few tokens far ahead), zipf
    (log of 1 / rank^1.1, shuffled) or ties (normal * 3 rounded to 0.25: large groups of equal logits)."""
    if kind == "flat":
        logits = rng.normal(size=vocab) * 3
    elif kind == "peaked":
        logits = rng.normal(size=vocab)
        logits[rng.choice(vocab, 4, replace=False)] = rng.uniform(9, 14, size=4)
    elif kind == "zipf":
        logits = rng.permutation(-1.1 * np.log(np.arange(1, vocab + 1)))
    else:
        logits = np.round(rng.normal(size=vocab) * 12) / 4
    return logits.astype(np.float32)


def transformers_scores(logits: np.ndarray, history: np.ndarray, params: SamplingParams, top_p=None):
    """(scores after repetition penalty and temperature, after top-k and top-p too), in float64."""
    ids, scores = torch.tensor(history, dtype=torch.long)[None], torch.tensor(logits, dtype=torch.float64)[None]
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    scaled = scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    top_p = params.top_p if top_p is None else top_p
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scaled[0].numpy(), scores[0].numpy()


def decided_by_the_rule(logits, history, params) -> bool:
    """Whether transformers keeps as many tokens with top_p moved by ROUNDING_MARGIN either way."""
    if params.top_p == 1.0:
        return True
    counts = {np.isfinite(transformers_scores(logits, history, params, top_p)[1]).sum()
              for top_p in (params.top_p * (1 - ROUNDING_MARGIN), params.top_p * (1 + ROUNDING_MARGIN))}
    return counts == {np.isfinite(transformers_scores(logits, history, params)[1]).sum()}


def assert_kept_like_transformers(ours: np.ndarray, expected: np.ndarray, scaled: np.ndarray) -> None:
    """ours, expected: masks of kept tokens. They must be equal, except inside a group of tied
    scores that top-p cuts through: transformers' sort leaves the order of tied tokens unspecified,
    so there we must keep exactly as many of them as it does, and (our rule) the lowest ids."""
    for value in np.unique(scaled[ours != expected]):
        group = np.flatnonzero(scaled == value)
        count = int(expected[group].sum())
        assert ours[group].sum() == count, f"tied score {value}: {ours[group].sum()} kept, transformers keeps {count}"
        assert ours[group[:count]].all(), f"tied score {value}: the kept ones must be the lowest ids"


def random_params(rng: np.random.Generator, vocab: int) -> SamplingParams:
    top_k = int(rng.choice([0, 1, 2, 5, vocab // 3, vocab + 3]))
    top_p = float(rng.choice([1.0, rng.uniform(0.01, 1.0), rng.uniform(0.9, 0.999)]))
    return SamplingParams(temperature=float(rng.uniform(0.3, 2.0)), top_k=top_k, top_p=top_p,
                          repetition_penalty=float(rng.choice([1.0, rng.uniform(0.7, 1.8)])),
                          seed=int(rng.integers(1 << 30)))


# At the full vocabulary transformers takes 0.1-0.3 s a row here, so these are chosen rather than
# many random: each row shape with top-k, top-p, both, and the repetition penalty; ties at the
# k-th score (ties, top_k=100) and inside top-p's cut (ties, top_p=0.7).
FULL_VOCABULARY_CASES = [
    ("flat", dict(temperature=0.8, top_p=0.9)), ("flat", dict(temperature=1.2, top_k=50, repetition_penalty=1.3)),
    ("flat", dict(temperature=0.6, top_p=0.97, repetition_penalty=1.5)),
    ("peaked", dict(temperature=1.0, top_p=0.95, repetition_penalty=1.2)), ("peaked", dict(temperature=0.5, top_k=5)),
    ("zipf", dict(temperature=0.7, top_k=1000, top_p=0.8)), ("zipf", dict(temperature=1.5, top_p=0.5)),
    ("ties", dict(temperature=1.0, top_k=100)), ("ties", dict(temperature=0.9, top_p=0.7)),
    ("ties", dict(temperature=2.0, top_k=5000, top_p=0.9, repetition_penalty=0.8)),
]


def full_vocabulary_cases():
    """(logits, history, params) of FULL_VOCABULARY_CASES; each must be decided by the rule."""
    rng = np.random.default_rng(VOCAB)
    made = []
    for seed, (kind, settings) in enumerate(FULL_VOCABULARY_CASES):
        logits, history = row_of(kind, VOCAB, rng), rng.integers(0, VOCAB, size=int(rng.integers(1, 64)))
        params = SamplingParams(seed=seed, **settings)
        assert decided_by_the_rule(logits, history, params), f"{kind} {settings}: rounding decides it, choose another"
        made.append((logits, history, params))
    return made


def random_cases(vocab: int, count: int):
    """`count` rows of each shape in turn with random settings, skipping the few decided by rounding."""
    rng = np.random.default_rng(vocab)
    made = []
    while len(made) < count:
        logits = row_of(["flat", "peaked", "zipf", "ties"][len(made) % 4], vocab, rng)
        history, params = rng.integers(0, vocab, size=int(rng.integers(1, 64))), random_params(rng, vocab)
        if decided_by_the_rule(logits, history, params):
            made.append((logits, history, params))
    return made


@pytest.mark.parametrize("rows", [full_vocabulary_cases, lambda: random_cases(50, 200), lambda: random_cases(7, 100)],
                         ids=["vocab262144", "vocab50", "vocab7"])
def test_the_tokens_that_can_be_sampled_are_those_transformers_keeps(rows):
    rows = rows()
    samplers = [Sampler(params, prompt_index=i) for i, (_, _, params) in enumerate(rows)]
    kept_masks = []
    for (logits, history, params), sampler in zip(rows, samplers):
        scaled, expected = transformers_scores(logits, history, params)
        ours = sampler.process(logits, history)
        kept = np.isfinite(expected)
        assert_kept_like_transformers(np.isfinite(ours), kept, scaled)
        same = np.isfinite(ours) & kept
        np.testing.assert_allclose(ours[same], expected[same], rtol=1e-12)
        kept_masks.append(np.isfinite(ours))
    # All the rows, each with its own settings, in one call, 20 times: every token is a kept one.
    logits = np.stack([row[0] for row in rows])
    for _ in range(20):
        tokens = sample(logits, samplers, [row[1] for row in rows])
        assert tokens.dtype == np.int64 and tokens.shape == (len(rows),)
        assert all(kept[token] for kept, token in zip(kept_masks, tokens))


@pytest.mark.parametrize("vocab, top_p, kept",
                         [(8, 0.5, 4), (8, 0.625, 5), (VOCAB, 0.25, VOCAB // 4), (VOCAB, 1e-9, 1)])
def test_top_p_on_equal_logits_cuts_where_transformers_does(vocab, top_p, kept):
    """Equal logits put the cut exactly on top_p (the masses are binary fractions, exact in both):
    a token whose mass above equals top_p is dropped, and top_p -> 0 still keeps one token."""
    logits, history = np.zeros(vocab, np.float32), np.array([0])
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=0)
    scaled, expected = transformers_scores(logits, history, params)
    ours = np.isfinite(Sampler(params).process(logits, history))
    assert ours.sum() == np.isfinite(expected).sum() == kept
    assert_kept_like_transformers(ours, np.isfinite(expected), scaled)
    assert sample(logits[None], [Sampler(params)], [history])[0] < kept


def test_draws_reach_every_kept_token_of_a_small_set_at_full_vocabulary():
    rng = np.random.default_rng(5)
    logits = row_of("flat", VOCAB, rng)
    history = rng.integers(0, VOCAB, size=40)
    for params in (SamplingParams(temperature=1.5, top_k=6, seed=1),
                   SamplingParams(temperature=0.5, top_p=0.7, repetition_penalty=1.3, seed=2)):
        _, expected = transformers_scores(logits, history, params)
        probs = torch.softmax(torch.tensor(expected), 0).numpy()
        kept = set(np.flatnonzero(np.isfinite(expected)).tolist())
        # 300 draws miss one of at most 12 tokens of probability >= 5% with probability < 3e-6
        assert 1 < len(kept) <= 12 and probs[sorted(kept)].min() >= 0.05
        samplers = [Sampler(params, prompt_index=i) for i in range(30)]
        drawn = np.concatenate([sample(np.tile(logits, (30, 1)), samplers, [history] * 30) for _ in range(10)])
        assert set(drawn.tolist()) == kept


SMALL_ROW = np.array([2.0, 1.5, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 3.0], np.float32)


def spread_row() -> np.ndarray:
    """4096 logits, 12 likely ones spread over the 4 blocks of 1024 that the draw searches in two
    levels, the rest at -40 (together under 1e-14 of the mass)."""
    rng = np.random.default_rng(8)
    logits = np.full(4096, -40.0, np.float32)
    logits[rng.choice(4096, 12, replace=False)] = rng.uniform(0, 2, size=12)
    return logits


CHI_SQUARE_CASES = [
    (SMALL_ROW, dict(temperature=1.0)), (SMALL_ROW, dict(temperature=0.6, top_k=4)),
    (SMALL_ROW, dict(temperature=1.3, top_p=0.8)), (SMALL_ROW, dict(temperature=0.9, repetition_penalty=1.7)),
    (SMALL_ROW, dict(temperature=2.0, top_k=6, top_p=0.7, repetition_penalty=0.8)),
    (spread_row(), dict(temperature=1.0)), (spread_row(), dict(temperature=0.7, top_k=2000, repetition_penalty=1.2)),
]


@pytest.mark.parametrize("logits, settings", CHI_SQUARE_CASES, ids=[
    "small-temperature", "small-top_k", "small-top_p", "small-penalty", "small-all", "spread-temperature",
    "spread-top_k-penalty"])
def test_sampled_frequencies_follow_the_filtered_softmax(logits, settings):
    """Chi-square goodness of fit of 5,000 draws against softmax(transformers' filtered scores).
    The seeds are fixed, so this is deterministic; with other seeds a correct sampler would fail a
    case with probability 1e-3, the p-value bound."""
    history = np.array([0, 3, 9, 9])
    params = SamplingParams(seed=11, **settings)
    _, expected = transformers_scores(logits, history, params)
    probs = torch.softmax(torch.tensor(expected), 0).numpy()
    samplers = [Sampler(params, prompt_index=i) for i in range(50)]
    drawn = np.concatenate([sample(np.tile(logits, (50, 1)), samplers, [history] * 50) for _ in range(100)])
    counts = np.bincount(drawn, minlength=logits.shape[0])
    likely = probs * drawn.shape[0] >= 5  # where the chi-square approximation holds
    assert probs[~likely].sum() * drawn.shape[0] < 1e-3 and counts[~likely].sum() == 0
    expected_counts = probs[likely] * drawn.shape[0]
    statistic = ((counts[likely] - expected_counts) ** 2 / expected_counts).sum()
    degrees = likely.sum() - 1
    p_value = torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64),
                                      torch.tensor(statistic / 2, dtype=torch.float64)).item()
    assert p_value > 1e-3, f"chi-square {statistic:.1f} on {degrees} degrees of freedom, p = {p_value:.2g}"


REQUESTS = [
    dict(), dict(repetition_penalty=1.3), dict(temperature=0.9), dict(temperature=1.2, top_k=50),
    dict(temperature=0.8, top_p=0.9), dict(temperature=1.1, top_k=40, top_p=0.95, repetition_penalty=1.2),
    dict(temperature=0.7, top_p=0.5, repetition_penalty=0.9),
]


def decode(order: list[int], noise_rows: int, steps: int, logits_of) -> dict[int, list[int]]:
    """Run the requests in `order` (with unseeded other requests interleaved) through sample() for
    `steps` steps; each request's tokens."""
    rng = np.random.default_rng(len(order) * 100 + noise_rows)
    noise = [Sampler(SamplingParams(temperature=1.0, top_k=int(rng.integers(0, 100)), repetition_penalty=1.1))
             for _ in range(noise_rows)]
    members = [(r, Sampler(SamplingParams(seed=100 + r, **REQUESTS[r]), prompt_index=r)) for r in order]
    members += [(None, sampler) for sampler in noise]
    members = [members[i] for i in rng.permutation(len(members))] if noise_rows else members
    histories = {id(s): list(range(r or 0, (r or 0) + 5)) for r, s in members}
    for step in range(steps):
        logits = np.stack([logits_of(-1 if r is None else r, step) for r, _ in members])
        tokens = sample(logits, [s for _, s in members], [np.array(histories[id(s)]) for _, s in members])
        for (_, sampler), token in zip(members, tokens):
            histories[id(sampler)].append(int(token))
    return {r: histories[id(s)][5:] for r, s in members if r is not None}


def test_a_row_gets_the_same_tokens_alone_or_in_any_batch():
    cache = {}

    def logits_of(request, step):
        if (request, step) not in cache:
            rng = np.random.default_rng([request + 1, step])
            cache[request, step] = row_of("zipf" if request % 2 else "flat", VOCAB, rng)
        return cache[request, step]

    everyone = list(range(len(REQUESTS)))
    alone = {r: decode([r], 0, 6, logits_of)[r] for r in everyone}
    assert decode(everyone, 0, 6, logits_of) == alone
    assert decode(everyone[::-1], 0, 6, logits_of) == alone
    assert decode([5, 2, 0], 4, 6, logits_of) == {r: alone[r] for r in (5, 2, 0)}
    assert decode(everyone, 9, 6, logits_of) == alone
    assert len({tuple(tokens) for tokens in alone.values()}) == len(REQUESTS)  # the requests differ


def test_greedy_rows_are_the_argmax_whatever_else_is_in_the_batch():
    rng = np.random.default_rng(3)
    logits = np.stack([row_of(kind, VOCAB, rng) for kind in ("flat", "ties", "zipf", "peaked", "ties")])
    logits[4, [7, 90_000]] = logits[4].max() + 1  # a tie for the maximum: the lowest id, as np.argmax
    history = rng.integers(0, VOCAB, size=30)
    samplers = [Sampler(SamplingParams()), Sampler(SamplingParams(temperature=0.8, top_p=0.9, seed=1)),
                Sampler(SamplingParams(top_k=3, top_p=0.2)), Sampler(SamplingParams(repetition_penalty=1.5)),
                Sampler(SamplingParams())]
    tokens = sample(logits, samplers, [history] * 5)
    assert tokens[[0, 2, 4]].tolist() == np.argmax(logits[[0, 2, 4]], axis=1).tolist()  # top-k/p do not apply
    assert tokens[4] == 7
    penalized = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor(history)[None], torch.tensor(logits[3:4]))
    assert tokens[3] == int(torch.argmax(penalized[0]))


def test_sample_refuses_rows_without_a_sampler_or_history():
    logits = np.zeros((2, 10), np.float32)
    with pytest.raises(PersimmonError, match=r"^sample\(\) got logits of shape \(2, 10\) with 1 samplers and 2 "):
        sample(logits, [Sampler(SamplingParams())], [np.array([])] * 2)
    with pytest.raises(PersimmonError, match=r"shape \(10,\)"):
        sample(logits[0], [Sampler(SamplingParams())], [np.array([])])
