"""Classification over a classifier build (`persimmon-export build --task sequence-classification`
or `token-classification`): texts in, labels and scores out. No torch.

    from persimmon_runtime import Classifier
    clf = Classifier.load("builds/reward")
    clf.classify("I loved it.")          # -> Classification(label, score, labels, scores)
    clf.classify(["a", "b", ...])        # any number of texts: run in batches of max_batch

Scores follow the build's problem_type (transformers' names): softmax over the labels
(single_label_classification), a sigmoid per label (multi_label_classification: `labels` holds
every label scoring >= 0.5) or the logits as they are (regression). Texts are tokenized as the
build's tokenizer says (BOS included by default) and right-padded with the build's pad_token_id;
a sequence classifier reads each text at its last token that is not the pad token (as
transformers does), and one without a pad_token_id runs one text at a time (transformers refuses
batches without one). Token classification returns, per text, one TokenLabel per token with the
characters of the text it stands for (BOS, which stands for none, is left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends.onnxruntime import open_session
from .backends.step import check_token_ids
from .errors import PersimmonError
from .manifest import CAUSAL_LM, Manifest
from .tokenizer import Tokenizer, build_tokenizer

MULTI_LABEL_THRESHOLD = 0.5  # a multi-label classifier's labels: those whose sigmoid reaches this


@dataclass
class Classification:
    """One text's sequence classification."""
    label: str             # the best-scoring label
    score: float
    labels: list           # multi-label: every label scoring >= 0.5 (best first); else [label]
    scores: dict           # every label -> its score


@dataclass
class TokenLabel:
    """One token's classification: it stands for text[start:end]."""
    token_id: int
    start: int
    end: int
    text: str
    label: str
    score: float
    scores: dict


class Classifier:
    def __init__(self, manifest: Manifest, tokenizer: Tokenizer, session):
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.session = session
        self.labels = list(manifest.classifier.labels)
        self.problem_type = manifest.classifier.problem_type
        self.pad_token_id = manifest.classifier.pad_token_id
        self.per_token = manifest.task == "token-classification"
        # without a pad token transformers refuses sequence-classification batches: one text per run
        self.max_batch = manifest.max_batch if self.per_token or self.pad_token_id is not None else 1

    @classmethod
    def load(cls, build_dir: str, device: str = "cpu", verify_checksums: bool = True) -> "Classifier":
        """Open a classifier build directory on onnxruntime; device "cpu", "cuda" or "cuda:N"."""
        manifest = Manifest.load(build_dir, verify_checksums=verify_checksums)
        if manifest.task == CAUSAL_LM:
            raise PersimmonError(f"{build_dir} is a causal-lm build, not a classifier: open it with "
                                 f"persimmon_runtime.generator.Generator.load, or build with --task")
        tokenizer = build_tokenizer(build_dir, manifest)
        _, session, _ = open_session(build_dir, manifest, device)
        return cls(manifest, tokenizer, session)

    def classify(self, texts: str | list[str]):
        """One text -> its result; a list -> a list, same order. A result is a Classification
        (sequence classification) or a list of TokenLabel (token classification)."""
        single = isinstance(texts, str)
        texts = [texts] if single else texts
        encoded = self.encode(texts)
        results = self.interpret(texts, encoded, self.logits([ids for ids, _ in encoded]))
        return results[0] if single else results

    def interpret(self, texts: list[str], encoded: list, logits: list[np.ndarray]) -> list:
        """Results from `encode`'s output and `logits` (the steps of `classify`, for callers that
        check requests one by one and run them together, as the Triton model does)."""
        return [self._tokens(text, ids, spans, row) if self.per_token else self._sequence(row)
                for text, (ids, spans), row in zip(texts, encoded, logits)]

    def logits(self, token_ids: list[list[int]]) -> list[np.ndarray]:
        """fp32 logits per text: [num_labels], or [tokens, num_labels] for token classification.
        Texts run in batches of at most max_batch, similar lengths together (less padding)."""
        self._check_token_ids(token_ids)
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        out: list = [None] * len(token_ids)
        for start in range(0, len(order), self.max_batch):
            rows = order[start:start + self.max_batch]
            logits = self._run([token_ids[i] for i in rows])
            for row, index in enumerate(rows):
                out[index] = logits[row, :len(token_ids[index])] if self.per_token else logits[row]
        return out

    def encode(self, texts) -> list[tuple[list[int], list]]:
        """(ids, character spans) per text; every text is checked before any compute."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise PersimmonError("texts must be a str or a non-empty list of str")
        encoded = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise PersimmonError(f"text {index} is a {type(text).__name__}, not a str")
            self.tokenizer.check_length(f"text {index}", text, self.manifest.max_text_tokens,
                                        "the build's most tokens per text")
            ids, spans = self.tokenizer.encode_with_offsets(text)
            self._check_length(index, len(ids))
            encoded.append((ids, spans))
        return encoded

    def _check_length(self, index: int, count: int) -> None:
        limit = self.manifest.max_text_tokens
        if not 1 <= count <= limit:
            raise PersimmonError(f"text {index} is {count} tokens; this build classifies texts of 1 to {limit} "
                                 f"tokens: shorten it or rebuild with a larger --max-text-tokens")

    def _check_token_ids(self, token_ids) -> None:
        """`logits` takes ids from anyone: the same length and id bounds the graph needs, one line each."""
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, (list, tuple)):
            raise PersimmonError("token_ids must be a list of token id lists (an empty list: no texts, no logits)")
        for index, ids in enumerate(token_ids):
            if not isinstance(ids, (list, tuple, np.ndarray)):
                raise PersimmonError(f"text {index}: token ids must be a list of int, got {type(ids).__name__}")
            self._check_length(index, len(ids))
            row = np.asarray([ids])
            if row.ndim != 2 or not np.issubdtype(row.dtype, np.integer):
                raise PersimmonError(f"text {index}: token ids must be a list of int")
            try:
                check_token_ids(row, self.manifest.model.vocab_size)
            except PersimmonError as e:
                raise PersimmonError(f"text {index}: {e}") from None

    def _run(self, rows: list[list[int]]) -> np.ndarray:
        """One graph run: rows right-padded with the pad token (0 without one), masked."""
        width = max(len(ids) for ids in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id or 0, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for row, ids in enumerate(rows):
            input_ids[row, :len(ids)], mask[row, :len(ids)] = ids, 1
        logits = self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})[0]
        if not np.isfinite(logits).all():
            raise PersimmonError(f"the model computed non-finite logits for a batch of {len(rows)} text(s); the "
                                 f"build overflows ({self.manifest.dtype}): rebuild with --dtype float32")
        return logits

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Scores from logits over the last axis, as problem_type says."""
        if self.problem_type == "multi_label_classification":
            return 1.0 / (1.0 + np.exp(-logits))
        if self.problem_type == "single_label_classification":
            shifted = np.exp(logits - logits.max(-1, keepdims=True))
            return shifted / shifted.sum(-1, keepdims=True)
        return logits

    def _labelled(self, scores: np.ndarray) -> tuple[str, float, list, dict]:
        best = int(np.argmax(scores))
        chosen = [best]
        if self.problem_type == "multi_label_classification":
            chosen = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= MULTI_LABEL_THRESHOLD]
        return (self.labels[best], float(scores[best]), [self.labels[i] for i in chosen],
                {label: float(value) for label, value in zip(self.labels, scores)})

    def _sequence(self, logits: np.ndarray) -> Classification:
        return Classification(*self._labelled(self.scores(logits)))

    def _tokens(self, text: str, ids: list[int], spans: list, logits: np.ndarray) -> list[TokenLabel]:
        skip = 1 if self.tokenizer.add_bos else 0  # BOS stands for no text
        results = []
        for token_id, (start, end), scores in zip(ids[skip:], spans[skip:], self.scores(logits)[skip:]):
            label, score, _, all_scores = self._labelled(scores)
            results.append(TokenLabel(token_id, start, end, text[start:end], label, score, all_scores))
        return results
