"""Tiny Persimmon checkpoints and tokenizers, made locally (no downloads) for the demo and tests.

The tokenizer is trained the way LLM vocabularies are: sentencepiece Unigram with byte fallback,
identity normalization (newlines and control characters survive), whitespace kept, and a
`|ENDOFTEXT|` piece for BOS/EOS.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time

import sentencepiece as spm
import torch

from persimmon_runtime import IncrementalDetokenizer, Tokenizer, format_chat
from persimmon_runtime.tokenizer import DEFAULT_BOS

from .config import PersimmonConfig
from .load.checkpoint import load_model, save_model, tokenizer_files
from .reference.generate import greedy_generate
from .reference.model import PersimmonForCausalLM

log = logging.getLogger(__name__)

DEMO_TEXTS = [
    "human: What is the capital of France?\n\nadept: The capital of France is Paris.",
    "human: Simply put, the theory of relativity states that?\n\nadept: The laws of physics are the "
    "same for all observers, regardless of their relative motion.",
    "human: Write a haiku about the sea.\n\nadept: Grey waves fold and break\nsalt wind combs the dune grass "
    "flat\ngulls argue at dusk",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Persimmon-8B is a decoder-only transformer with 36 layers, 64 heads and a 16K context.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 -42 1e-5",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji are bytes too: 🎉 🦄 🍣 👍🏽 ❤️",
    "Tabs\tand   runs of   spaces, and blank lines\n\n\nall survive identity normalization.",
]


def train_tokenizer(out_file: str, texts=DEMO_TEXTS, vocab_size: int = 400, special_as_user_defined: bool = False,
                    repeat: int = 20) -> str:
    """Train a sentencepiece Unigram model to `out_file`; `|ENDOFTEXT|` is a control piece
    (or, with special_as_user_defined, a user-defined piece that sentencepiece would match in text)."""
    special = {"user_defined_symbols" if special_as_user_defined else "control_symbols": [DEFAULT_BOS]}
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts) * repeat), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_by_whitespace=True, allow_whitespace_only_pieces=True,
        hard_vocab_limit=False, character_coverage=0.9995, max_sentence_length=1 << 16,
        minloglevel=2, **special)
    with open(out_file, "wb") as f:
        f.write(model.getvalue())
    return out_file


def random_model(config: PersimmonConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> PersimmonForCausalLM:
    """A model with random weights, LayerNorm affines included (so they matter in parity tests)."""
    generator = torch.Generator().manual_seed(seed)
    model = PersimmonForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def make_demo_checkpoint(out_dir: str, seed: int = 0, dtype: str = "float32", overwrite: bool = False,
                         **config_fields) -> str:
    """A tiny HF-layout checkpoint (config.json, model.safetensors, tokenizer files) in out_dir."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Tokenizer(train_tokenizer(os.path.join(tmp, "tokenizer.model")))
        fields = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=512, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.bos_id)
        fields.update(config_fields)
        # Like the real model, the embedding is wider than the vocabulary (rounded up to 64).
        fields.setdefault("vocab_size", -(-tokenizer.vocab_size // 64) * 64)
        model = random_model(PersimmonConfig(**fields), seed)
        return save_model(model, out_dir, dtype=dtype, extra_files=tokenizer_files(tokenizer), overwrite=overwrite)


def run_demo(out_dir: str, prompt: str = "What is the capital of France?", max_new_tokens: int = 24,
             overwrite: bool = False) -> str:
    """Make the demo checkpoint, load it back and stream a greedy chat answer from the reference model."""
    t0 = time.perf_counter()
    make_demo_checkpoint(out_dir, overwrite=overwrite)
    log.info(f"wrote tiny checkpoint + tokenizer to {out_dir} ({time.perf_counter() - t0:.2f}s)")
    return stream_greedy_answer(out_dir, prompt, max_new_tokens)[0]


def stream_greedy_answer(checkpoint: str, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """Print the reference model's greedy chat answer as it is made, stopping at the checkpoint's
    EOS or after max_new_tokens; return (the answer, tokens generated, EOS included as
    transformers counts it) and log that count, so what the demo reports is what the model did."""
    model = load_model(checkpoint)
    tokenizer = Tokenizer.from_dir(checkpoint)
    eos = model.config.eos_token_id
    text = format_chat(prompt)
    prompt_ids = tokenizer.encode(text)
    log.info(f"prompt ({len(prompt_ids)} tokens): {text!r}")
    log.info("reference model (random weights, so the answer is noise), greedy:")
    stream = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = []

    def emit(step, token):
        if int(token[0]) != eos:  # EOS ends the answer; it is not text
            pieces.append(stream.push(int(token[0])))
            print(pieces[-1], end="", flush=True)

    t0 = time.perf_counter()
    output = greedy_generate(model, torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, eos_token_id=eos,
                             on_token=emit)
    pieces.append(stream.finish())
    elapsed = time.perf_counter() - t0
    print(pieces[-1])
    generated = output.shape[1] - len(prompt_ids)
    ending = "stopped at EOS" if int(output[0, -1]) == eos else "max_new_tokens reached"
    log.info(f"{generated} tokens in {elapsed:.2f}s ({generated / elapsed:.0f} tokens/s; {ending})")
    return "".join(pieces), generated
