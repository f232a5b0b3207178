"""What parity holds a build to: the bounds per precision and one backend's result against them
(shared by `parity`, causal LMs, and `classify_parity`, classifiers)."""

from __future__ import annotations

from dataclasses import dataclass

# Weight-only int8/int4 against fp32 (docs/quantization.md has the table): random-weight models
# are the worst case (no trained structure; each layer's rounding noise grows through relu^2), so
# these bounds catch a broken build (wrong packing: error >> max|logit|, top-1 ~ 1/vocab), not a
# quality claim. Observed, max|dlogit| / max|logit| and top-1: int8 2.5% / 88.9% at 100M, 2.8% /
# 100% at 30M, 2.9% / 92.6% and 1.4% / 96.3% on the tests' tiny random and transformers-written
# checkpoints; int4 33% / 37% at 100M, 43% / 44% at 30M, 38% / 56% and 21% / 67% tiny.
INT8_MAX_ABS, INT8_TOP1 = 0.05, 0.80
INT4_MAX_ABS, INT4_TOP1 = 0.60, 0.25
# fp32 must match closely and generate the same tokens; fp16's bound scales with the logits
# (2% of the largest |logit|) and its greedy tokens may part at near-ties (reported, not failed).
PREFILL_INT8 = "int8-prefill"
BOUNDS = {"float32": {"max_abs": 1e-3, "relative": False, "top1": 0.99, "greedy_must_match": True},
          "float16": {"max_abs": 0.02, "relative": True, "top1": 0.95, "greedy_must_match": False},
          # 8 significant bits to fp16's 11: each rounding 8x coarser (observed 1.6% emulated, tiny model)
          "bfloat16": {"max_abs": 0.05, "relative": True, "top1": 0.90, "greedy_must_match": False},
          # weight-only quantized builds (any dtype: the weights' rounding dominates)
          "int8": {"max_abs": INT8_MAX_ABS, "relative": True, "top1": INT8_TOP1, "greedy_must_match": False},
          "int4": {"max_abs": INT4_MAX_ABS, "relative": True, "top1": INT4_TOP1, "greedy_must_match": False}}
# a float build whose prompt steps ran its int8 prefill graph (int8 weights per channel, activations
# per token): int8's bounds, the decode steps after it reading the cache those steps wrote
BOUNDS[PREFILL_INT8] = BOUNDS["int8"]
# a float32 build whose KV cache is int8 (`--kv-cache int8`, per-channel scales from calibration):
# each cached key and value rounded to 1/254 of its channel's range; int8 weights' bounds
KV_INT8 = "kv-int8"
BOUNDS[KV_INT8] = BOUNDS["int8"]


@dataclass
class ParityResult:
    backend: str
    dtype: str
    decode_steps: int
    prefill_max_abs_diff: float
    max_abs_diff: float
    bound: float
    top1_agreement: float
    min_top1: float
    greedy_rows_identical: int
    rows: int
    greedy_must_match: bool
    note: str = ""  # one more line for the report, e.g. what was emulated

    @property
    def passed(self) -> bool:
        greedy_ok = self.greedy_rows_identical == self.rows or not self.greedy_must_match
        return self.max_abs_diff <= self.bound and self.top1_agreement >= self.min_top1 and greedy_ok

    def line(self) -> str:
        return (f"{self.backend:12s} {self.dtype:8s} steps {self.decode_steps:3d}  max|dlogit| prefill "
                f"{self.prefill_max_abs_diff:.2e} all {self.max_abs_diff:.2e} (bound {self.bound:.2e})  top-1 "
                f"{self.top1_agreement:.1%} (min {self.min_top1:.0%})  greedy rows identical "
                f"{self.greedy_rows_identical}/{self.rows}  {'PASS' if self.passed else 'FAIL'}")
