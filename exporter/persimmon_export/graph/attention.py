"""Attention for onnxruntime builds: com.microsoft.GroupQueryAttention over caches allocated once.

The `capacity` cache layout: every cache holds all kv_capacity slots, and GroupQueryAttention
(GQA) both writes the step's new keys/values into it (the cache is bound as `past_*` and
`present_*`: one buffer, written in place) and attends, per row, to its first `reach` slots
only (reach: the 1s of its attention_mask), so a step's cost follows each row's context, not the
capacity (chosen by measurement: docs/benchmarks.md, "Decode cost follows the context"). GQA reads no mask values
(a row's tokens are its first slots; onnxruntime's CUDA kernel takes no attention bias either),
and its CPU kernel refuses a multi-token step on several rows that already hold tokens: the
onnxruntime backend runs such steps row by row.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.reference.op_run import OpRun

CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_OPSET = 1
# onnxruntime's GroupQueryAttention refuses other head sizes ("head_size must be a multiple of 8")
HEAD_DIM_MULTIPLE = 8


def onnxruntime_cache_layout(head_dim: int) -> str:
    """The cache layout of an onnxruntime build: `capacity` where GroupQueryAttention takes the head
    size (Persimmon-8B's 64 does), else the older `whole` (MatMul/Softmax, caches grown by copying)."""
    return "capacity" if head_dim % HEAD_DIM_MULTIPLE == 0 else "whole"


def gqa_lengths(g, reach: str, kv_length: str, one: str) -> tuple[str, str]:
    """(seqlens_k [batch] int32, total_sequence_length scalar int32), shared by every layer: `reach`
    [batch], the slots each row holds after the step, and `kv_length`, the mask's width. (GQA
    takes a step as a row's first when its length equals total_sequence_length: its tokens are
    then at slots 0 .. seq - 1 and a row's reach may be shorter, right padding.)"""
    seqlens = g.op("Cast", g.op("Sub", reach, one), to=TensorProto.INT32, name="seqlens_k")
    total = g.op("Cast", kv_length, to=TensorProto.INT32, name="total_sequence_length")
    return seqlens, total


def grouped_query_attention(g, q: str, k: str, v: str, layer: int, lengths: tuple[str, str], hidden_shape: str,
                            heads: int, head_dim: int, cache_scales: list[str] | None = None) -> str:
    """One layer's attention: q/k/v [B, T, heads, head_dim] -> [B, T, hidden]; writes the layer's caches.
    No attention_bias input: onnxruntime's CUDA kernel refuses one. `cache_scales` (key, value):
    int8 caches, x stored as round(x / scale) per channel (onnxruntime 1.31+, float32 activations)."""
    query, key, value = (g.op("Reshape", t, hidden_shape) for t in (q, k, v))  # GQA takes [B, T, heads*head_dim]
    outputs = [f"model.layers.{layer}.attention_out", f"present_key_{layer}", f"present_value_{layer}"]
    quantized = {} if cache_scales is None else {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL",
                                                  "kv_cache_bit_width": 8}
    # inputs 7-11 (cos_cache, sin_cache, position_ids, attention_bias, head_sink) are left out
    scales = [] if cache_scales is None else ["", "", "", "", "", *cache_scales]
    return g.op("GroupQueryAttention", query, key, value, f"past_key_{layer}", f"past_value_{layer}", *lengths,
                *scales, outputs=outputs, domain=CONTRIB_DOMAIN, name=f"model.layers.{layer}.attention",
                num_heads=heads, kv_num_heads=heads, scale=head_dim ** -0.5, **quantized)[0]


def add_contrib_opset(model: onnx.ModelProto) -> None:
    """Import the com.microsoft opset if a node uses it and the model does not import it yet."""
    used = any(node.domain == CONTRIB_DOMAIN for node in model.graph.node)
    if used and all(o.domain != CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, CONTRIB_OPSET))


class GroupQueryAttention(OpRun):
    """The GQA kernel for onnx's reference evaluator (`emulate`), for the inputs our graph gives it
    (no rotary, no local window, kv_num_heads = num_heads): new keys/values written at
    seqlens_k + 1 - seq (at 0 in a first step, whose rows may hold fewer: right padding), scores
    and softmax in fp32, the output rounded once to the input's type (as onnxruntime's kernel, and
    fused GPU kernels, compute it)."""

    op_domain = CONTRIB_DOMAIN

    def _run(self, query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads=None,
             kv_num_heads=None, scale=None, **_):
        batch, seq, hidden = query.shape
        head_dim = hidden // num_heads
        present_key, present_value = past_key.copy(), past_value.copy()
        output = np.zeros((batch, seq, num_heads, head_dim), np.float32)
        for b in range(batch):
            reach = int(seqlens_k[b]) + 1
            # a first step (seq = total_sequence_length) starts at slot 0, its rows may be right-padded
            first = 0 if seq == int(total_sequence_length) else reach - seq
            present_key[b, :, first:first + seq] = key[b].reshape(seq, num_heads, head_dim).transpose(1, 0, 2)
            present_value[b, :, first:first + seq] = value[b].reshape(seq, num_heads, head_dim).transpose(1, 0, 2)
            q = query[b].reshape(seq, num_heads, head_dim).transpose(1, 0, 2).astype(np.float32)
            scores = q @ present_key[b, :, :reach].astype(np.float32).transpose(0, 2, 1) * np.float32(scale)
            allowed = np.arange(reach)[None, :] <= first + np.arange(seq)[:, None]
            scores = np.where(allowed, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            output[b] = (probs @ present_value[b, :, :reach].astype(np.float32)).transpose(1, 0, 2)
        return output.reshape(batch, seq, hidden).astype(query.dtype), present_key, present_value
