"""Perplexity of each build on a small *trained* model, against transformers fp32 (issue 24).

Random weights overstate quantization error (their activations have no structure for the int8
steps to fit), so this trains a small Persimmon for a few minutes on text that ships with Python -
the standard library's own source files - and measures on files it did not train on:

    .venv/bin/python benchmarks/perplexity.py                     # ~6 min: train, build, evaluate
    .venv/bin/python benchmarks/perplexity.py --smoke            # a quick check that it runs

Every held-out sequence (--prompt + --scored tokens) runs as a user's request does: the prompt in
one step (the int8 prefill graph where it is on: >= min_tokens new tokens), then one decode step
per token, fed the true next token (teacher forcing), so each scored token is predicted from a
cache the prompt step wrote. transformers scores the same tokens from one fp32 forward. Reported
per build and prefill setting: perplexity, its change against transformers, top-1 agreement with
transformers and the largest |dlogit| / max|logit|. Writes benchmarks/results/perplexity.json.
"""

from __future__ import annotations

import glob
import math
import os
import sys
import sysconfig
import tempfile
import time

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cli import BenchmarkParser, write_json  # noqa: E402
from machine import cpu_features  # noqa: E402

from persimmon_export.build import build  # noqa: E402
from persimmon_export.config import PersimmonConfig  # noqa: E402
from persimmon_export.demo import train_tokenizer  # noqa: E402
from persimmon_export.load.checkpoint import save_model, tokenizer_files  # noqa: E402
from persimmon_export.options import BuildOptions  # noqa: E402
from persimmon_export.reference.model import PersimmonForCausalLM  # noqa: E402
from persimmon_runtime import Tokenizer  # noqa: E402
from persimmon_runtime.backends import decode, prefill  # noqa: E402
from persimmon_runtime.generator import Generator  # noqa: E402

MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
VOCAB = 2048
# build label -> (build options, prefill settings to measure)
BUILDS = {"float32": ({"prefill": "int8"}, ("off", "int8")), "int8": ({"weights": "int8"}, ("off", "int8")),
          "int4": ({"weights": "int4"}, ("off", "int8")), "float16": ({"dtype": "float16"}, ("off",)),
          # the int8 KV cache (issue 28), alone and with int4 weights
          "float32 kv-int8": ({"kv_cache": "int8"}, ("off",)),
          "int4 kv-int8": ({"weights": "int4", "kv_cache": "int8"}, ("off",))}


def corpus() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): the standard library's top-level modules, every tenth held out."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    texts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return [t for i, t in enumerate(texts) if i % 10], [t for i, t in enumerate(texts) if i % 10 == 0]


def train(work: str, train_seconds: float, tokenizer_sources: int, seq: int, batch: int, positions: int
          ) -> tuple[str, Tokenizer, dict]:
    """Train the tokenizer (on the first `tokenizer_sources` training files) and the model (MODEL,
    `positions` long, on `batch` windows of `seq` tokens per step) for `train_seconds`; returns
    (checkpoint, tokenizer, log)."""
    train_texts, _ = corpus()
    lines = [line for text in train_texts[:tokenizer_sources] for line in text.splitlines() if line.strip()]
    tokenizer = Tokenizer(train_tokenizer(os.path.join(work, "tokenizer.model"), texts=lines, vocab_size=VOCAB,
                                          repeat=1))
    ids = torch.tensor([t for text in train_texts for t in tokenizer.encode(text)], dtype=torch.long)
    config = PersimmonConfig(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                             eos_token_id=tokenizer.bos_id, max_position_embeddings=positions, **MODEL)
    torch.manual_seed(0)
    model = PersimmonForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    started, step, losses = time.perf_counter(), 0, []
    generator = torch.Generator().manual_seed(0)
    while (elapsed := time.perf_counter() - started) < train_seconds:
        for group in optimizer.param_groups:  # warm up, then decay linearly to 10% over the time given
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 50) * max(0.1, 1 - elapsed / train_seconds)
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
        x = torch.stack([ids[s:s + seq + 1] for s in starts])
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"train step {step}: loss {np.mean(losses[-50:]):.3f} ({elapsed:.0f} s)", flush=True)
    checkpoint = save_model(model.eval(), os.path.join(work, "checkpoint"), extra_files=tokenizer_files(tokenizer))
    return checkpoint, tokenizer, {"steps": step, "window": seq, "batch": batch, "tokens_seen": step * batch * seq,
                                   "train_tokens": len(ids),
                                   "final_loss": float(np.mean(losses[-50:])), "seconds": train_seconds}


def held_out_sequences(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    _, texts = corpus()
    ids = [t for text in texts for t in tokenizer.encode(text)]
    stride = max(length, (len(ids) - length) // count)
    sequences = [ids[i:i + length] for i in range(0, stride * count, stride) if i + length <= len(ids)]
    if len(sequences) < count:
        raise SystemExit(f"the held-out text has {len(ids)} tokens: too few for {count} sequences of {length}")
    return sequences[:count]


def score(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under fp32 log-softmax of its logits row."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return log_z - logits[np.arange(len(targets)), targets]


def ours(build_dir: str, setting: str, sequences: list[list[int]], prompt: int) -> tuple[list[np.ndarray], str]:
    """Per sequence, the logits that predict tokens prompt .. end: one prompt step, then decode steps."""
    backend = Generator.load(build_dir, prefill=setting).backend
    rows = []
    for ids in sequences:
        logits, positions = prefill(backend, [ids[:prompt]])
        steps = [logits[0]]
        for token in ids[prompt:-1]:
            steps.append(decode(backend, np.array([token]), positions)[0])
        rows.append(np.stack(steps))
    return rows, backend.prefill_kernels


def main() -> None:
    parser = BenchmarkParser(__doc__, "perplexity.json", dict(train_seconds=3, tokenizer_sources=10, sequences=2,
                                                             prompt=16, scored=8, builds=["float32", "int4 kv-int8"]))
    parser.add_argument("--train-seconds", type=float, default=300.0)
    parser.add_argument("--tokenizer-sources", type=int, default=200,
                        help="standard library files the tokenizer trains on (default 200)")
    parser.add_argument("--train-seq", type=int, default=256, help="tokens per training window (default 256)")
    parser.add_argument("--train-batch", type=int, default=16, help="windows per training step (default 16)")
    parser.add_argument("--sequences", type=int, default=32, help="held-out sequences (default 32)")
    parser.add_argument("--prompt", type=int, default=128, help="tokens in each sequence's prompt step (default 128)")
    parser.add_argument("--scored", type=int, default=128, help="tokens scored after it (default 128)")
    parser.add_argument("--builds", nargs="+", default=list(BUILDS), choices=list(BUILDS), metavar="BUILD",
                        help=f"which builds (default all: {', '.join(repr(b) for b in BUILDS)})")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as work:
        positions = max(512, args.train_seq, args.prompt + args.scored)
        checkpoint, tokenizer, training = train(work, args.train_seconds, args.tokenizer_sources, args.train_seq,
                                                args.train_batch, positions)
        sequences = held_out_sequences(tokenizer, args.sequences, args.prompt + args.scored)
        targets = [np.array(ids[args.prompt:]) for ids in sequences]
        hf = transformers.PersimmonForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        with torch.no_grad():
            reference = [hf(torch.tensor([ids])).logits[0, args.prompt - 1:-1].numpy() for ids in sequences]
        rows = [summarize("transformers float32", "", reference, reference, targets)]
        for label in args.builds:
            options, settings = BUILDS[label]
            out = os.path.join(work, f"build-{label}")
            build(checkpoint, out, BuildOptions(backend="onnxruntime", max_batch=1,
                                                kv_capacity=args.prompt + args.scored,
                                                **{"dtype": "float32", **options}))
            for setting in settings:
                logits, kernels = ours(out, setting, sequences, args.prompt)
                rows.append(summarize(f"persimmon {label}", kernels, logits, reference, targets))
    base = rows[0]["perplexity"]
    for row in rows:
        row["vs_transformers"] = row["perplexity"] / base - 1
        print(f"{row['runtime']:24s} prefill {row['prefill']:44s} perplexity {row['perplexity']:8.3f} "
              f"({row['vs_transformers']:+.2%}), top-1 = transformers {row['top1_agreement']:.1%}, "
              f"max|dlogit|/max|logit| {row['max_rel_logit_error']:.2%}", flush=True)
    report = {"machine": cpu_features(), "model": {**MODEL, "max_position_embeddings": positions},
              "vocab_size": tokenizer.vocab_size, "training": training,
              "sequences": len(sequences), "prompt_tokens": args.prompt, "scored_tokens": args.scored, "rows": rows}
    write_json(args.json, report)


def summarize(runtime: str, kernels: str, logits: list[np.ndarray], reference: list[np.ndarray],
              targets: list[np.ndarray]) -> dict:
    nll = np.concatenate([score(got, want) for got, want in zip(logits, targets)])
    agree = np.concatenate([got.argmax(-1) == ref.argmax(-1) for got, ref in zip(logits, reference)])
    error = max(float(np.abs(got - ref).max() / np.abs(ref).max()) for got, ref in zip(logits, reference))
    return {"runtime": runtime, "prefill": kernels or "-", "perplexity": math.exp(float(nll.mean())),
            "top1_agreement": float(agree.mean()), "max_rel_logit_error": error}


if __name__ == "__main__":
    main()
