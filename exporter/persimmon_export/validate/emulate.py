"""True-fp16 (and bf16) evaluation of a build's step graph on CPU: what a TensorRT engine computes.

onnxruntime's CPU provider computes an fp16 graph in fp32 (it inserts casts), so an fp16
overflow never shows on CPU; a strongly typed TensorRT engine computes in the graph's types. This
module evaluates the graph with onnx's reference evaluator, whose numpy kernels store every fp16
(bf16: ml_dtypes) tensor in its type and round every op's result to it, keeping the graph's own
fp32 islands; MatMul is replaced and GroupQueryAttention added (see both). What differs from a GPU
(accumulation order, fused epilogues, plugins) is listed in docs/validation.md; none of it moves
the point where a stored fp16 tensor overflows, which is what this evaluation is for.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from persimmon_runtime.backends.step import check_step, run_rows, step_feeds
from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.manifest import Manifest

from ..graph.attention import GroupQueryAttention
from ..graph.export import NUMPY_DTYPES

DESCRIPTION = ("storage and arithmetic in the graph's own types (fp16/bf16 tensors rounded after every op; "
               "fp32 only where the graph casts to it), onnx reference evaluator, matmuls accumulated in fp32")


class MatMul(OpRun):
    """fp16 (bf16) MatMul with exact products, fp32 accumulation and one rounding of each output:
    what fp16 (bf16) tensor-core GEMMs with an fp32 accumulator compute (which accumulator a
    TensorRT kernel uses is its choice; fp32 is assumed here, not observed: no engine has run on a GPU).

    numpy's own fp16 matmul has the same semantics (it converts each element to fp32 and
    accumulates in fp32: partial sums past 65504 do not overflow) but runs a scalar loop at
    ~0.24 GFLOP/s here; converting the operands to fp32 (exact) and calling BLAS gives the same
    result up to the fp32 summation order, ~37x faster on a 64x1024 @ 1024x4096 product. The
    products of two bf16 (8-bit significands) are exact in fp32 too, so bf16 is done the same way.
    The class name is the op type the evaluator replaces.
    """

    op_domain = ""

    def _run(self, a, b):
        if a.dtype in (np.float16, NUMPY_DTYPES["bfloat16"]):
            return ((a.astype(np.float32) @ b.astype(np.float32)).astype(a.dtype),)
        return (np.matmul(a, b),)


def true_precision_evaluator(model: str | onnx.ModelProto) -> ReferenceEvaluator:
    """A reference evaluator over `model` (a path, whose external data is read from beside it,
    or a ModelProto with its weights inside) that computes in the graph's own types."""
    return ReferenceEvaluator(model, new_ops=[MatMul, GroupQueryAttention])


class EmulatedBackend:
    """A build's step graph evaluated in true precision, with the runtime backends' interface
    (start, step), so `persimmon_runtime.backends.prefill`/`decode` drive it.

    Caches hold kv_capacity slots in the build's dtype. A `whole`-layout graph (onnxruntime
    builds) attends to its caches whole, so each step's mask is padded with zeros to that length.
    """

    name = "emulated"

    def __init__(self, build_dir: str):
        self.manifest = Manifest.load(build_dir)
        if self.manifest.cache_dtype != self.manifest.dtype:
            raise PersimmonError(f"{build_dir}: its caches are {self.manifest.cache_dtype} (--kv-cache): emulation "
                                 f"covers caches in the build's dtype; compare it with onnxruntime (parity)")
        self.evaluator = true_precision_evaluator(os.path.join(build_dir, self.manifest.onnx.file))
        self.output_names = list(self.evaluator.output_names)
        self.caches: dict[str, np.ndarray] = {}
        self.batch = 0

    @property
    def max_step_tokens(self) -> int:
        return self.manifest.kv_capacity

    def start(self, batch: int) -> None:
        """Zeroed caches for `batch` rows."""
        shape = (batch, *self.manifest.cache_shape)
        self.caches = {name: np.zeros(shape, NUMPY_DTYPES[self.manifest.dtype]) for name in self.manifest.cache_inputs}
        self.batch = batch

    def step(self, input_ids, first_slot, token_count, attention_mask, first_row: int = 0) -> np.ndarray:
        """One graph step on rows first_row.. of the caches; returns fp32 logits [rows, vocab]
        (NaN/inf where the emulated arithmetic overflowed)."""
        check_step(self.manifest, self.batch, input_ids, first_slot, token_count, attention_mask, first_row)
        return run_rows(self._run, self.manifest.onnx.cache_layout, input_ids, first_slot, token_count,
                        attention_mask, first_row)

    def _run(self, input_ids, first_slot, token_count, attention_mask, first_row: int) -> np.ndarray:
        rows = slice(first_row, first_row + input_ids.shape[0])
        if self.manifest.onnx.cache_layout == "whole":
            padded = np.zeros((attention_mask.shape[0], self.manifest.kv_capacity), np.int64)
            padded[:, :attention_mask.shape[1]] = attention_mask
            attention_mask = padded
        feeds = step_feeds(self.manifest.step_inputs, input_ids, first_slot, token_count, attention_mask)
        feeds.update({name: cache[rows] for name, cache in self.caches.items()})
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is the finding, reported by the values
            outputs = dict(zip(self.output_names, self.evaluator.run(None, feeds)))
        for present, past in self.manifest.cache_aliases.items():
            self.caches[past][rows] = outputs[present]
        return outputs["logits"].reshape(len(input_ids), -1)


def emulated_step(build_dir: str, input_ids, first_slot, token_count, attention_mask) -> np.ndarray:
    """Logits [batch, vocab] of one step over fresh zero caches, in true precision (see module doc)."""
    if not (isinstance(input_ids, np.ndarray) and input_ids.ndim == 2):
        raise PersimmonError(f"input_ids must be a 2-D numpy array [batch, seq] of token ids, got "
                             f"{type(input_ids).__name__} of shape {np.shape(input_ids)}")
    backend = EmulatedBackend(build_dir)
    backend.start(input_ids.shape[0])
    return backend.step(input_ids, first_slot, token_count, attention_mask)
