"""config.json: every HF field, both rope layouts, and clear rejections of impossible values."""

import json

import pytest
import transformers

from persimmon_export import ConfigError, PersimmonConfig

SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def test_defaults_are_persimmon_8b():
    c = PersimmonConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (262144, 4096, 36, 64)
    assert (c.head_dim, c.rotary_dims, c.rope_theta, c.hidden_act) == (64, 32, 25000.0, "relu2")


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 4.0}])
def test_transformers_reads_what_we_write(tmp_path, scaling):
    ours = PersimmonConfig(**SMALL, rope_scaling=scaling, partial_rotary_factor=0.25, rope_theta=1234.0,
                           layer_norm_eps=1e-6, pad_token_id=0, bos_token_id=5, eos_token_id=6, torch_dtype="bfloat16")
    ours.save(tmp_path)
    hf = transformers.PersimmonConfig.from_pretrained(tmp_path)
    rope = hf.rope_parameters
    assert rope["rope_theta"] == 1234.0 and rope["partial_rotary_factor"] == 0.25
    assert rope["rope_type"] == (scaling["type"] if scaling else "default")
    assert (hf.layer_norm_eps, hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (1e-6, 0, 5, 6)
    assert PersimmonConfig.from_file(tmp_path) == ours


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 3.0}])
def test_we_read_what_transformers_5_writes(tmp_path, scaling):
    hf = transformers.PersimmonConfig(**SMALL, rope_theta=777.0, partial_rotary_factor=0.75, rope_scaling=scaling,
                                      qk_layernorm=False, num_labels=3)
    hf.save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    ours = PersimmonConfig.from_file(tmp_path / "config.json")
    assert (ours.rope_theta, ours.partial_rotary_factor, ours.qk_layernorm, ours.num_labels) == (777.0, 0.75, False, 3)
    assert ours.rope_scaling_type == (scaling["rope_type"] if scaling else None)


@pytest.mark.parametrize("fields,message", [
    (dict(num_attention_heads=5), r"num_attention_heads \(5\) must divide hidden_size \(64\)"),
    (dict(hidden_size=48, num_attention_heads=4, partial_rotary_factor=0.25), r"= 3; it must be even"),
    (dict(partial_rotary_factor=1.5), r"partial_rotary_factor must be in \(0, 1\]"),
    (dict(partial_rotary_factor=0.05), r"= 0; it must be even and >= 2"),
    (dict(hidden_act="swish2"), r"hidden_act 'swish2' is not supported"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), r"rope_scaling type 'yarn' is not supported"),
    (dict(rope_scaling={"type": "linear", "factor": 0.5}), r"factor must be a number >= 1"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer"),
    (dict(layer_norm_eps=0.0), r"layer_norm_eps must be > 0"),
    (dict(bos_token_id=100), r"token id 100 is outside the vocabulary \(size 100\)"),
    (dict(torch_dtype="int8"), r"torch_dtype 'int8'"),
])
def test_impossible_values_are_rejected(fields, message):
    with pytest.raises(ConfigError, match=message):
        PersimmonConfig(**{**SMALL, **fields})


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "persimmon", **SMALL, "num_attention_heads": 3}))
    with pytest.raises(ConfigError, match=rf"{path}: num_attention_heads \(3\) must divide"):
        PersimmonConfig.from_file(path)
    path.write_text(json.dumps({"model_type": "persimmon", **SMALL, "num_experts": 8}))
    with pytest.raises(ConfigError, match=rf"{path}: unknown config fields \['num_experts'\]"):
        PersimmonConfig.from_file(path)
    path.write_text(json.dumps({**SMALL}))
    with pytest.raises(ConfigError, match="model_type is None, not 'persimmon'"):
        PersimmonConfig.from_file(path)
