"""`persimmon-export parity` for classifier builds: the build's logits against the fp32 torch
reference's, text by text (each reference run holds one text, unpadded; the build runs them in
batches of max_batch, right-padded, as `Classifier` serves them)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from persimmon_runtime.classifier import Classifier
from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.manifest import Manifest

from ..graph.classify import MODEL_CLASSES
from ..load.checkpoint import load_model
from .bounds import BOUNDS, ParityResult

log = logging.getLogger(__name__)


@torch.no_grad()
def check_classifier_parity(checkpoint: str, build_dir: str, manifest: Manifest, texts, backends=("onnxruntime",),
                            max_abs: float | None = None, min_top1: float | None = None,
                            emulate: bool = False) -> list[ParityResult]:
    """One result: max |logit difference| over every text (and token) and top-1 label agreement,
    under the bounds of the build's dtype (`bounds.BOUNDS`)."""
    if list(backends) != ["onnxruntime"] or emulate:
        raise PersimmonError(f"{build_dir} is a {manifest.task} build: parity checks it on onnxruntime only "
                             f"(--backend onnxruntime, no --emulate)")
    classifier = Classifier.load(build_dir)
    token_ids = [ids for ids, _ in classifier.encode(list(texts))]
    got = classifier.logits(token_ids)
    reference = load_model(checkpoint, dtype="float32", model_class=MODEL_CLASSES[manifest.task]).eval()
    log.info(f"{manifest.task}: {len(texts)} texts against the fp32 reference")
    diffs, agree, total, scale = [], 0, 0, 0.0
    for ids, logits in zip(token_ids, got):
        expected = reference(torch.tensor([ids]))[0].numpy()
        diffs.append(float(np.abs(logits - expected).max()))
        agree += int((logits.argmax(-1) == expected.argmax(-1)).sum())
        total += expected.size // expected.shape[-1]
        scale = max(scale, float(np.abs(expected).max()))
    spec = BOUNDS[manifest.dtype]
    bound = max_abs if max_abs is not None else spec["max_abs"] * (scale if spec["relative"] else 1.0)
    worst = float(np.max(diffs))  # np.max: a NaN difference is not lost
    return [ParityResult("onnxruntime", manifest.dtype, 0, worst, worst, bound, agree / total,
                         min_top1 if min_top1 is not None else spec["top1"], len(texts), len(texts), False,
                         note=f"  {manifest.task}: logits of {len(texts)} texts ({total} label predictions)")]
