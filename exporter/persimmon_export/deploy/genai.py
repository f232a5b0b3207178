"""onnxruntime-genai's view of a build: genai_config.json beside the graph.

onnxruntime-genai (`og.Model(BUILD)`) loads a folder holding `genai_config.json`; its model
builder does not know Persimmon, so the build writes the file itself for causal-LM onnxruntime
builds (cache layout `capacity`): the graph already takes what onnxruntime-genai feeds
(input_ids, attention_mask, past_key_%d / past_value_%d bound as shared buffers of kv_capacity
slots) and gives the last token's logits as [batch, 1, vocab]. Its tokenizer is a separate
matter: see docs/onnxruntime-genai.md.
"""

from __future__ import annotations

import json
import logging
import os

from persimmon_runtime.manifest import CAUSAL_LM, FileEntry, Manifest
from persimmon_runtime.tokenizer import Tokenizer
from persimmon_runtime.verify import sha256_file

log = logging.getLogger(__name__)
GENAI_CONFIG_FILE = "genai_config.json"
# onnxruntime-genai's generic decoder-only model type (it also lists llama, mistral, phi, ...)
MODEL_TYPE = "decoder"


def serves(manifest: Manifest) -> bool:
    """Whether onnxruntime-genai can run this build: a causal LM whose graph takes its inputs."""
    return manifest.task == CAUSAL_LM and manifest.onnx.cache_layout == "capacity"


def genai_config(manifest: Manifest, tokenizer: Tokenizer) -> dict:
    """genai_config.json for `manifest`'s graph. Greedy search by default, up to kv_capacity tokens
    (prompt included); pad_token_id is the sentencepiece unknown piece, which byte fallback keeps
    out of every encoding (onnxruntime-genai pads batches with it and finds each row's end by it;
    without byte fallback a prompt ending in unknown characters would look padded: said in the log)."""
    model, graph = manifest.model, manifest.onnx
    sp = tokenizer.sp
    if not any(sp.is_byte(i) for i in range(sp.get_piece_size())):
        log.warning(f"{GENAI_CONFIG_FILE}: the tokenizer has no byte fallback, so text can encode to its unknown "
                    f"piece {sp.unk_id()}, which onnxruntime-genai takes for padding (pad_token_id) at a batch "
                    f"row's end")
    eos = manifest.eos_token_ids
    return {
        "model": {
            "type": MODEL_TYPE,
            "vocab_size": model.vocab_size,
            "context_length": manifest.kv_capacity,
            "bos_token_id": tokenizer.bos_id if tokenizer.bos_id is not None else -1,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": sp.unk_id(),
            "decoder": {
                "filename": graph.file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": model.head_dim,
                "hidden_size": model.num_attention_heads * model.head_dim,
                "num_attention_heads": model.num_attention_heads,
                "num_key_value_heads": model.num_attention_heads,
                "num_hidden_layers": model.num_hidden_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_%d", "past_value_names": "past_value_%d"},
                "outputs": {"logits": "logits", "present_key_names": "present_key_%d",
                            "present_value_names": "present_value_%d"},
            },
        },
        "search": {
            "max_length": manifest.kv_capacity, "min_length": 0, "do_sample": False, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "temperature": 1.0, "top_k": 1,
            "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0, "early_stopping": True,
        },
    }


def write_genai_config(out_dir: str, manifest: Manifest, tokenizer: Tokenizer) -> dict[str, FileEntry]:
    """Write out_dir/genai_config.json where onnxruntime-genai can run the build; {name: FileEntry}."""
    if not serves(manifest):
        return {}
    path = os.path.join(out_dir, GENAI_CONFIG_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(genai_config(manifest, tokenizer), f, indent=2)
    return {GENAI_CONFIG_FILE: FileEntry(os.path.getsize(path), sha256_file(path))}
