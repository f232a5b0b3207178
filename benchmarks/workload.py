"""The models and prompts every benchmark here runs: random-weight Persimmon configs of about 30M,
100M and 300M parameters, a sentencepiece tokenizer padded to the model's vocabulary, and
prompts of an exact token length.

The tokenizer covers the whole vocabulary, so whatever a random model generates decodes to text
(the Generator and Triton see real pieces), and the same prompt is the same ids for every runtime.
"""

from __future__ import annotations

import os

import numpy as np

from persimmon_export import PersimmonConfig
from persimmon_export.demo import random_model, train_tokenizer
from persimmon_export.load.checkpoint import save_model, tokenizer_files
from persimmon_runtime import Tokenizer

CONFIGS = {
    "30M": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
    "100M": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, intermediate_size=3072),
    "300M": dict(hidden_size=1024, num_hidden_layers=20, num_attention_heads=16, intermediate_size=4096),
}
VOCAB = 32000
SHAPES = ["8B", *CONFIGS]  # what the 8B-scale scripts build: the real shape, or a config above for --smoke


def shape_sizes(shape: str) -> dict:
    """PersimmonConfig arguments of a SHAPES entry ("8B": the defaults, Persimmon-8B's own)."""
    return {} if shape == "8B" else dict(CONFIGS[shape], vocab_size=VOCAB)


def random_checkpoint(work: str, name: str, vocab: int = VOCAB, max_position_embeddings: int = 4096
                      ) -> tuple[str, int]:
    """A transformers-loadable checkpoint of CONFIGS[name] (random weights, seed 0) with a padded
    tokenizer; returns (checkpoint directory, first added tokenizer piece)."""
    tokenizer_file = os.path.join(work, f"tokenizer-{vocab}.model")
    first_added = padded_tokenizer(tokenizer_file, vocab)
    tokenizer = Tokenizer(tokenizer_file)
    config = PersimmonConfig(vocab_size=vocab, max_position_embeddings=max_position_embeddings,
                             bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.bos_id, **CONFIGS[name])
    checkpoint = save_model(random_model(config, seed=0), os.path.join(work, f"checkpoint-{name}-{vocab}"),
                            extra_files=tokenizer_files(tokenizer))
    return checkpoint, first_added


def padded_tokenizer(out_file: str, vocab: int) -> int:
    """A sentencepiece model of exactly `vocab` pieces; returns the id of the first added piece.

    sentencepiece cannot train 262,144 pieces from a small corpus, so a small trained model gets
    normal pieces `▁v000000`, `▁v000001`, ... appended. Their scores are below every trained
    piece, so ordinary text tokenizes as before, while a run of them (" v000007 v000042") is one
    token each: that is how the prompts hit an exact length and decoding meets real pieces.
    """
    from sentencepiece import sentencepiece_model_pb2

    trained = train_tokenizer(out_file)
    model = sentencepiece_model_pb2.ModelProto()
    with open(trained, "rb") as f:
        model.ParseFromString(f.read())
    first_added = len(model.pieces)
    if first_added >= vocab:
        raise SystemExit(f"vocabulary {vocab} is smaller than the trained tokenizer's {first_added} pieces")
    lowest = min(p.score for p in model.pieces)
    for i in range(vocab - first_added):
        piece = model.pieces.add()
        piece.piece, piece.score = f"\u2581v{i:06d}", lowest - 1.0 - i * 1e-6
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    with open(out_file, "wb") as f:
        f.write(model.SerializeToString())
    return first_added


def prompt_texts(tokenizer_file: str, first_added: int, count: int, tokens: int, seed: int) -> list[str]:
    """`count` prompts of exactly `tokens` token ids each (BOS included), random added pieces."""
    tokenizer = Tokenizer(tokenizer_file)
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        ids = rng.integers(first_added, tokenizer.vocab_size, tokens - 1)
        # without its first space: sentencepiece adds one (the dummy prefix)
        text = "".join(tokenizer.sp.id_to_piece(int(i)).replace("\u2581", " ") for i in ids)[1:]
        if len(tokenizer.encode(text)) != tokens:
            raise SystemExit(f"a prompt meant to be {tokens} tokens encodes to {len(tokenizer.encode(text))}")
        texts.append(text)
    return texts
