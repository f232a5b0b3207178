"""The reference model against Hugging Face transformers' Persimmon, on random tiny configs."""

import pytest
import torch
import transformers

from persimmon_export import (
    PersimmonConfig,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonForTokenClassification,
)
from persimmon_export.demo import random_model
from persimmon_export.reference.generate import greedy_generate

CONFIGS = {
    # head_dim 16, the Persimmon defaults scaled down
    "base": dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, num_hidden_layers=2),
    # head_dim 24 (not a power of two), rotary 12 dims, no QK LayerNorm
    "head24_no_qkln": dict(hidden_size=72, num_attention_heads=3, intermediate_size=160, num_hidden_layers=2,
                           qk_layernorm=False),
    # full rotary, linear rope scaling, 3 layers
    "full_rotary_linear": dict(hidden_size=80, num_attention_heads=4, intermediate_size=192, num_hidden_layers=3,
                               partial_rotary_factor=1.0, rope_scaling={"type": "linear", "factor": 2.0},
                               rope_theta=10000.0),
    # dynamic NTK scaling that kicks in past 16 positions
    "dynamic": dict(hidden_size=48, num_attention_heads=2, intermediate_size=96, num_hidden_layers=2,
                    max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0}),
}
VOCAB = 320


def make_pair(fields, seed=0, model_class=PersimmonForCausalLM, hf_class=transformers.PersimmonForCausalLM, **extra):
    config = PersimmonConfig(vocab_size=VOCAB, max_position_embeddings=fields.get("max_position_embeddings", 256),
                             eos_token_id=None, bos_token_id=None,
                             **{k: v for k, v in fields.items() if k != "max_position_embeddings"}, **extra)
    causal = random_model(config, seed)
    ours = model_class(config).eval()
    ours.load_state_dict(causal.state_dict(), strict=False)
    if model_class is not PersimmonForCausalLM:
        torch.manual_seed(seed)
        torch.nn.init.normal_(ours.score.weight)
    hf = hf_class(transformers.PersimmonConfig.from_dict(config.to_dict())).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours, hf


def left_padded_batch(lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
        ids[row, :width - length] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_logits_match_transformers(name):
    ours, hf = make_pair(CONFIGS[name])
    ids, mask = left_padded_batch([24, 17, 5])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got - expected).abs()[real].max() <= 1e-4
    # unpadded batch, positions from 0: the dynamic config goes past max_position_embeddings here
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["base", "head24_no_qkln", "full_rotary_linear"])
def test_incremental_decoding_with_static_cache_equals_full_forward(name):
    ours, _ = make_pair(CONFIGS[name])
    ids, mask = left_padded_batch([20, 13])
    prompt = 8
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        ours.setup_cache(max_batch=4, kv_capacity=64)
        slots_mask = torch.zeros(2, 64, dtype=torch.long)
        slots_mask[:, :ids.shape[1]] = mask
        steps = [ours(ids[:, :prompt], attention_mask=slots_mask, cache_position=torch.arange(prompt))]
        for slot in range(prompt, ids.shape[1]):
            steps.append(ours(ids[:, slot:slot + 1], attention_mask=slots_mask, cache_position=torch.tensor([slot])))
        ours.drop_cache()
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (incremental - full).abs()[real].max() <= 1e-5


@pytest.mark.parametrize("name", ["base", "head24_no_qkln", "full_rotary_linear"])
def test_greedy_generation_is_token_identical_to_transformers_generate(name):
    ours, hf = make_pair(CONFIGS[name], seed=3)
    ids, mask = left_padded_batch([12, 7, 3], seed=4)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                               pad_token_id=0)
    got = greedy_generate(ours, ids, attention_mask=mask, max_new_tokens=40)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_sequence_classification_matches_transformers():
    ours, hf = make_pair(CONFIGS["base"], model_class=PersimmonForSequenceClassification,
                         hf_class=transformers.PersimmonForSequenceClassification, pad_token_id=0, num_labels=3)
    ids, mask = left_padded_batch([10, 6, 3])
    ids[ids == 0] = 1
    ids[~mask.bool()] = 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    assert got.shape == (3, 3)
    assert (got - expected).abs().max() <= 1e-4


def test_token_classification_matches_transformers():
    ours, hf = make_pair(CONFIGS["head24_no_qkln"], model_class=PersimmonForTokenClassification,
                         hf_class=transformers.PersimmonForTokenClassification, num_labels=5)
    ids, mask = left_padded_batch([9, 4])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert got.shape == (2, 9, 5)
    assert (got - expected).abs()[real].max() <= 1e-4


def test_sequence_classification_needs_a_pad_token_for_batches():
    ours, _ = make_pair(CONFIGS["base"], model_class=PersimmonForSequenceClassification,
                        hf_class=transformers.PersimmonForSequenceClassification)
    with pytest.raises(ValueError, match="pad_token_id"):
        ours(torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 0.05), (torch.bfloat16, 0.3)])
def test_half_precision_error_against_fp32_is_bounded(dtype, bound):
    fp32, _ = make_pair(CONFIGS["base"], seed=5)
    half = random_model(fp32.config, seed=5, dtype=dtype)
    ids, mask = left_padded_batch([24, 10])
    with torch.no_grad():
        reference = fp32(ids, attention_mask=mask)
        got = half(ids, attention_mask=mask)
    real = mask.bool()
    error = (got - reference).abs()[real].max().item()
    scale = reference[real].abs().max().item()
    assert got.dtype == torch.float32  # logits come back in fp32 whatever the weights
    assert torch.isfinite(got[real]).all()
    assert error <= bound * max(1.0, scale / 10), (error, scale)
    # greedy choices mostly agree (ties within half-precision noise may flip)
    agree = (got.argmax(-1) == reference.argmax(-1))[real].float().mean().item()
    assert agree >= 0.9


def test_fp16_layernorm_statistics_do_not_overflow():
    # Activations of a few hundred make x**2 overflow fp16 (max 65504); fp32 statistics don't care.
    from persimmon_export.reference.model import layer_norm_fp32

    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * 400
    weight, bias = torch.ones(256), torch.zeros(256)
    reference = torch.nn.functional.layer_norm(x, (256,), weight, bias, 1e-5)
    got = layer_norm_fp32(x.half(), weight.half(), bias.half(), 1e-5)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert (got.float() - reference).abs().max() <= 5e-3
