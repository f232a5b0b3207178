"""Checkpoint directories: formats, dtypes, sharding, memory, and clear errors on bad input."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import save_file

from persimmon_export import PersimmonConfig, PersimmonForCausalLM, PersimmonForSequenceClassification
from persimmon_export.config import ConfigError
from persimmon_export.demo import random_model
from persimmon_export.load.checkpoint import CheckpointError, load_model, save_checkpoint, save_model

CONFIG = PersimmonConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 44]])


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=11)


@pytest.fixture
def saved(tmp_path, model):
    return save_model(model, str(tmp_path / "ckpt"))


def logits(m):
    with torch.no_grad():
        return m(IDS)


def test_round_trip_and_transformers_loads_our_directory(saved, model):
    assert sorted(os.listdir(saved)) == [".persimmon-export", "config.json", "model.safetensors"]
    loaded = load_model(saved)
    assert torch.equal(logits(loaded), logits(model))
    hf = transformers.PersimmonForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        assert (hf(IDS).logits - logits(model)).abs().max() <= 1e-4


def test_sharded_safetensors_with_index(tmp_path, model):
    out = save_model(model, str(tmp_path / "sharded"), max_shard_bytes=100_000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert torch.equal(logits(load_model(out)), logits(model))
    hf = transformers.PersimmonForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf(IDS).logits - logits(model)).abs().max() <= 1e-4


def test_pytorch_bin_single_and_sharded(tmp_path, model):
    state = model.state_dict()
    single = tmp_path / "bin"
    single.mkdir()
    CONFIG.save(single)
    torch.save(state, single / "pytorch_model.bin")
    assert torch.equal(logits(load_model(str(single))), logits(model))

    sharded = tmp_path / "bin_sharded"
    sharded.mkdir()
    CONFIG.save(sharded)
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, sharded / file)
        weight_map.update(dict.fromkeys(keys, file))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(logits(load_model(str(sharded))), logits(model))


@pytest.mark.parametrize("disk", ["float32", "float16", "bfloat16"])
def test_dtype_on_disk_is_kept_unless_asked(tmp_path, model, disk):
    out = save_model(model, str(tmp_path / disk), dtype=disk)
    assert json.loads(open(os.path.join(out, "config.json")).read())["torch_dtype"] == disk
    assert load_model(out).lm_head.weight.dtype == getattr(torch, disk)  # never a silent cast
    assert load_model(out, dtype="float32").lm_head.weight.dtype == torch.float32
    assert load_model(out, dtype=torch.bfloat16).model.layers[0].mlp.dense_4h_to_h.weight.dtype == torch.bfloat16


def test_head_models_load_from_a_causal_lm_checkpoint_only_when_complete(saved):
    with pytest.raises(CheckpointError, match=r"missing.*score\.weight"):
        load_model(saved, model_class=PersimmonForSequenceClassification)


def test_tied_embeddings(tmp_path):
    config = PersimmonConfig(**{**CONFIG.__dict__, "tie_word_embeddings": True})
    model = random_model(config, seed=2)
    out = save_model(model, str(tmp_path / "tied"))
    loaded = load_model(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_memory_is_about_one_copy_of_the_weights(tmp_path):
    # ~200 MB of fp32 weights (mostly embeddings); loading must not need two copies.
    config = PersimmonConfig(vocab_size=24576, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                             num_attention_heads=16)
    with torch.device("meta"):
        size = sum(p.numel() * 4 for p in PersimmonForCausalLM(config).parameters())
    directory = tmp_path / "big"
    directory.mkdir()
    config.save(directory)
    with torch.device("meta"):
        names = PersimmonForCausalLM(config).state_dict()
    save_file({k: torch.zeros(v.shape) for k, v in names.items()}, str(directory / "model.safetensors"))
    code = textwrap.dedent(f"""
        import resource, torch
        from persimmon_export.load.checkpoint import load_model
        torch.zeros(1) + 1
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = load_model({str(directory)!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(after - before)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = int(result.stdout.strip())
    print(f"growth {growth / 2**20:.0f} MiB, weights {size / 2**20:.0f} MiB")
    assert growth <= 1.35 * size, f"peak RSS grew {growth / 2**20:.0f} MiB for {size / 2**20:.0f} MiB of weights"


# ---- bad input: one clear error naming the file and the problem ----

def test_missing_directory_and_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(str(tmp_path / "nope"))
    CONFIG.save(tmp_path)
    with pytest.raises(CheckpointError, match=f"{tmp_path}: no weights found"):
        load_model(str(tmp_path))


def test_config_json_that_is_not_persimmon(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match=r"config\.json: model_type is 'llama', not 'persimmon'"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        load_model(str(tmp_path))


def test_missing_config_json(tmp_path, saved):
    os.remove(os.path.join(saved, "config.json"))
    with pytest.raises(ConfigError, match=r"config\.json: file not found"):
        load_model(saved)


def test_truncated_safetensors(saved):
    path = os.path.join(saved, "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file.*truncated"):
        load_model(saved)


def test_missing_tensor_and_shape_mismatch(tmp_path, model):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    directory = tmp_path / "bad"
    directory.mkdir()
    CONFIG.save(directory)
    missing = dict(state)
    del missing["model.layers.1.mlp.dense_4h_to_h.bias"]
    save_file(missing, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing.*model\.layers\.1\.mlp\.dense_4h_to_h\.bias"):
        load_model(str(directory))
    wrong = dict(state)
    wrong["model.layers.0.self_attn.dense.weight"] = torch.zeros(64, 32)
    save_file(wrong, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.dense\."
                                              r"weight' has shape \(64, 32\), config\.json implies \(64, 64\)"):
        load_model(str(directory))


def test_index_listing_a_missing_shard(tmp_path, model):
    out = save_model(model, str(tmp_path / "sharded"), max_shard_bytes=100_000)
    os.remove(os.path.join(out, "model-00002-of-" + sorted(os.listdir(out))[-2][-17:]))
    with pytest.raises(CheckpointError, match=r"index\.json: lists shard 'model-00002-of-\d+\.safetensors', which is missing"):
        load_model(out)


def test_save_replaces_a_directory_only_when_complete(tmp_path, model):
    out = save_model(model, str(tmp_path / "ckpt"))

    def exploding():
        yield "model.embed_tokens.weight", torch.zeros(2, 2)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(exploding(), CONFIG, out, overwrite=True)
    assert torch.equal(logits(load_model(out)), logits(model))  # the old checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # and no temp dir is left behind
