"""adept-inference (Megatron) checkpoint -> HF directory, without the adept-inference source."""

import enum
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import transformers
from conftest import error_line

from persimmon_export import PersimmonConfig
from persimmon_export.demo import random_model
from persimmon_export.load.checkpoint import load_model
from persimmon_export.load.convert import ConvertError, convert_megatron
from persimmon_runtime import Tokenizer

HIDDEN, HEADS, LAYERS, VOCAB = 96, 4, 2, 448  # head_dim 24, rotary 12 dims


def megatron_tree(state: dict, inv_freq: torch.Tensor) -> dict:
    """The nested `ckpt["model"]` of adept-inference, with its original key names."""
    encoder = {}
    for name, tensor in state.items():
        if name.startswith("model.layers.") or name.startswith("model.final_layernorm"):
            encoder[name.removeprefix("model.").replace("self_attn", "self_attention")] = tensor
    for layer in range(LAYERS):
        encoder[f"layers.{layer}.self_attention.rotary_emb.inv_freq"] = inv_freq
    return {"language_model": {"embedding": {"word_embeddings": {"weight": state["model.embed_tokens.weight"]}},
                               "encoder": encoder},
            "word_embeddings_for_head": {"weight": state["lm_head.weight"]}}


@pytest.fixture(scope="module")
def adept_checkpoint(tmp_path_factory, sp_model):
    """root/{adept_vocab.model, iter_0001000/mp_rank_00/model_optim_rng.pt} pickling foreign classes."""
    root = tmp_path_factory.mktemp("adept")
    tok = Tokenizer(sp_model)
    config = PersimmonConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                             intermediate_size=192, rope_theta=25000.0, partial_rotary_factor=0.5,
                             max_position_embeddings=2048, bos_token_id=tok.bos_id, eos_token_id=tok.bos_id)
    reference = random_model(config, seed=7, dtype=torch.bfloat16)
    state = reference.state_dict()
    rotary = config.rotary_dims
    inv_freq = 1.0 / (25000.0 ** (torch.arange(0, rotary, 2).float() / rotary))

    # Megatron pickles its own classes (args, enums, optimizer state): make them unimportable at load time.
    module = types.ModuleType("megatron_fake_arguments")
    Namespace = type("MegatronArgs", (), {"__module__": module.__name__})
    module.MegatronArgs = Namespace
    module.AttnMaskType = enum.Enum("AttnMaskType", "padding causal", module=module.__name__)
    sys.modules[module.__name__] = module
    args = Namespace()
    args.num_attention_heads, args.seq_length, args.layernorm_epsilon = HEADS, 2048, 1e-5
    args.attn_mask_type, args.params_dtype, args.data_path = module.AttnMaskType.causal, torch.bfloat16, ["a", "b"]
    ckpt = {"args": args, "checkpoint_version": 3.0, "iteration": 1000,
            "model": megatron_tree(state, inv_freq),
            "rng_state": [{"np_rng_state": np.random.RandomState(0).get_state()}],
            "optimizer": {"param_groups": [{"lr": 1e-4, "params": [0, 1]}],
                          "state": {0: {"exp_avg": torch.zeros(3), "step": 10}}}}
    target = root / "iter_0001000" / "mp_rank_00"
    target.mkdir(parents=True)
    torch.save(ckpt, target / "model_optim_rng.pt")
    del sys.modules[module.__name__]
    (root / "latest_checkpointed_iteration.txt").write_text("1000")
    (root / "adept_vocab.model").write_bytes(open(sp_model, "rb").read())
    return root, reference


def test_plain_torch_load_needs_the_source(adept_checkpoint):
    root, _ = adept_checkpoint
    with pytest.raises(Exception, match="megatron_fake_arguments"):
        torch.load(root / "iter_0001000" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)


def test_convert_without_the_source(adept_checkpoint, tmp_path, monkeypatch):
    root, reference = adept_checkpoint
    monkeypatch.chdir(tmp_path)
    out = convert_megatron(str(root), str(tmp_path / "hf"))

    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["torch_dtype"] == "bfloat16"
    assert config["num_attention_heads"] == HEADS and config["num_hidden_layers"] == LAYERS
    assert config["partial_rotary_factor"] == 0.5 and config["rope_theta"] == 25000.0
    assert config["max_position_embeddings"] == 2048
    assert config["bos_token_id"] == config["eos_token_id"] == Tokenizer(os.path.join(out, "tokenizer.model")).bos_id

    ids = torch.tensor([[5, 17, 300, 42, 8]])
    with torch.no_grad():
        expected = reference.float()(ids)
        ours = load_model(out, dtype="float32")(ids)
        hf = transformers.PersimmonForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    assert torch.equal(ours, expected)
    assert (hf - expected).abs().max() <= 1e-4


def test_converted_tokenizer_files_load_in_transformers(adept_checkpoint, tmp_path):
    root, _ = adept_checkpoint
    out = convert_megatron(str(root), str(tmp_path / "hf"))
    ours = Tokenizer.from_dir(out)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    text = "human: What is the capital of France?\n\nadept:"
    assert hf.convert_ids_to_tokens(hf(text)["input_ids"])[0] == "|ENDOFTEXT|"
    assert hf.decode(ours.encode(text), skip_special_tokens=True) == ours.decode(ours.encode(text)) == text


def test_cli_convert_and_errors(adept_checkpoint, tmp_path):
    root, _ = adept_checkpoint
    cli = [sys.executable, "-m", "persimmon_export.cli", "convert"]
    done = subprocess.run(cli + [str(root / "iter_0001000"), "--out", str(tmp_path / "hf"), "--dtype", "float16"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "tensors" in done.stderr and done.stdout == f"done: {tmp_path / 'hf'}\n" and json.load(open(tmp_path / "hf" / "config.json"))["torch_dtype"] == "float16"

    missing = subprocess.run(cli + [str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert missing.returncode == 2
    assert [error_line(missing.stderr)] == [
        f"persimmon-export convert: error: {tmp_path / 'nowhere'}: no such file or directory"]
    assert not os.path.exists(tmp_path / "x")


def test_missing_tokenizer_and_wrong_file(adept_checkpoint, tmp_path):
    root, _ = adept_checkpoint
    pt = root / "iter_0001000" / "mp_rank_00" / "model_optim_rng.pt"
    lonely = tmp_path / "lonely" / "iter_0000001" / "mp_rank_00"
    lonely.mkdir(parents=True)
    (lonely / "model_optim_rng.pt").write_bytes(pt.read_bytes())
    with pytest.raises(ConvertError, match="adept_vocab.model: not found; pass --tokenizer"):
        convert_megatron(str(tmp_path / "lonely"), str(tmp_path / "out"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ConvertError, match="junk.pt: cannot read the checkpoint"):
        convert_megatron(str(junk), str(tmp_path / "out"), tokenizer_file=str(root / "adept_vocab.model"))
    assert not os.path.exists(tmp_path / "out")
