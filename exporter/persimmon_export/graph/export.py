"""ONNX export: one Persimmon model step over a fixed-capacity, in-place KV cache.

The graph is written directly from the config (it mirrors `reference/model.py` op for op), and
the weights stream from the checkpoint into the external data file one tensor at a time, so
exporting the 8B model needs about one tensor of memory (torch.onnx would need the whole model
materialised, and inlines the custom-op functions). One graph serves prefill and decode; its
inputs, cache layouts and fp32 islands are described in docs/design.md ("The graph"), its
contract in docs/manifest.md. fp16 graphs fold a power-of-two scale into each MLP so that relu^2
stays finite (`relu2_scale`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterable

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import AttributeProto, TensorProto, helper

from persimmon_runtime.custom_ops import CUSTOM_OP_DOMAIN, CUSTOM_OP_VERSION, PLUGIN_VERSION, QK_LAYERNORM_OP, ROTARY_OP
from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.manifest import (
    CACHE_LAYOUTS,
    KV_CACHE_INT8,
    STEP_INPUT_SHAPES,
    STEP_INPUTS,
    CustomOps,
    FileEntry,
    GraphSection,
    TensorSpec,
)
from persimmon_runtime.verify import sha256_file

from ..config import PersimmonConfig
from ..progress import Steps
from ..reference.model import rope_inv_freq
from .attention import HEAD_DIM_MULTIPLE, add_contrib_opset, gqa_lengths, grouped_query_attention
from .onnx_versions import BASE_OPSET, declare_versions
from .quantize import PREFILL_DATA_FILE, PREFILL_FILE, WeightFormat, emit_matmul, linear_shapes, write_quantized

log = logging.getLogger(__name__)
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ONNX_TYPES = {TORCH_DTYPES[name]: onnx_type for name, onnx_type in ONNX_DTYPES.items()}  # torch dtype -> ONNX's
# numpy has no bfloat16 of its own: ml_dtypes' is the one onnx reads and writes
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# the largest relu^2 scale; each layer's may be lower. bfloat16 has fp32's exponent range, so
# relu(x)^2 overflows only past x ~ 1.8e19: no scale, the weights stored as the checkpoint has them
RELU2_SCALE = {"float32": 1.0, "float16": 16.0, "bfloat16": 1.0}
# W2*s^2 must stay below half of fp16's largest finite value: a weight one rounding away from inf
# leaves no room for a kernel that adds to it, and halving s is cheap (it lowers that layer's
# relu^2 limit from 256*s to 128*s, still far above the unscaled 256).
RELU2_WEIGHT_LIMIT = float(np.finfo(np.float16).max) / 2
_LINEAR = ("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight",
           "lm_head.weight", "score.weight")  # score: a classifier's head
_ALIGN = 64
KV_CACHE_MARGIN = 1.25  # int8 cache: headroom over the calibrated largest |key| / |value| per channel


class ExportError(PersimmonError):
    pass


def custom_op_functions() -> list[onnx.FunctionProto]:
    """The two custom ops, each with a body of standard ops that any ONNX runtime can execute
    (the opset they import is set with the model's, by `onnx_versions.declare_versions`)."""
    float32 = TensorProto.FLOAT
    plugin_attributes = ["plugin_version", "plugin_namespace"]

    def layer_norm(x, weight, bias, out):
        norm = helper.make_node("LayerNormalization", [f"{x}_f32", weight, bias], [f"{out}_f32"], axis=-1)
        norm.attribute.append(helper.make_attribute_ref("epsilon", AttributeProto.FLOAT))
        return [helper.make_node("Cast", [x], [f"{x}_f32"], to=float32), norm,
                helper.make_node("CastLike", [f"{out}_f32", x], [out])]

    qk_layernorm = helper.make_function(
        CUSTOM_OP_DOMAIN, QK_LAYERNORM_OP,
        inputs=["query", "key", "q_weight", "q_bias", "k_weight", "k_bias"], outputs=["query_out", "key_out"],
        nodes=layer_norm("query", "q_weight", "q_bias", "query_out") + layer_norm("key", "k_weight", "k_bias", "key_out"),
        opset_imports=[helper.make_opsetid("", BASE_OPSET)], attributes=["epsilon", *plugin_attributes],
        doc_string="Per-head LayerNorm of q and k over head_dim (fp32 statistics); q, k: [batch, seq, heads, head_dim].")

    def const(name, values):
        return helper.make_node("Constant", [], [name], value_ints=values)

    rotary = helper.make_function(
        CUSTOM_OP_DOMAIN, ROTARY_OP, inputs=["x", "cos", "sin"], outputs=["y"],
        nodes=[
            const("zero", [0]), const("two", [2]), const("last_axis", [-1]), const("end", [2**63 - 1]),
            const("last_dim", [-1]),
            helper.make_node("Shape", ["cos"], ["cos_shape"]),
            helper.make_node("Gather", ["cos_shape", "last_dim"], ["rotary_dims"], axis=0),
            helper.make_node("Div", ["rotary_dims", "two"], ["half"]),
            helper.make_node("Slice", ["x", "zero", "rotary_dims", "last_axis"], ["x_rot"]),
            helper.make_node("Slice", ["x", "rotary_dims", "end", "last_axis"], ["x_pass"]),
            helper.make_node("Cast", ["x_rot"], ["x_rot_f32"], to=float32),
            helper.make_node("Slice", ["x_rot_f32", "zero", "half", "last_axis"], ["x1"]),
            helper.make_node("Slice", ["x_rot_f32", "half", "rotary_dims", "last_axis"], ["x2"]),
            helper.make_node("Neg", ["x2"], ["neg_x2"]),
            helper.make_node("Concat", ["neg_x2", "x1"], ["rotated_half"], axis=-1),
            helper.make_node("Mul", ["x_rot_f32", "cos"], ["x_cos"]),
            helper.make_node("Mul", ["rotated_half", "sin"], ["x_sin"]),
            helper.make_node("Add", ["x_cos", "x_sin"], ["rotated_f32"]),
            helper.make_node("CastLike", ["rotated_f32", "x"], ["rotated"]),
            helper.make_node("Concat", ["rotated", "x_pass"], ["y"], axis=-1),
        ],
        opset_imports=[helper.make_opsetid("", BASE_OPSET)], attributes=plugin_attributes,
        doc_string="GPT-NeoX rotary on the first cos.shape[-1] dims of each head, the rest passed through; "
                   "x: [batch, seq, heads, head_dim], cos/sin: fp32 [batch, seq, 1, rotary_dims].")
    return [qk_layernorm, rotary]


class _GraphBuilder:
    """Appends nodes with unique names; `op(...)` returns the output name(s)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0
        self.consts: dict[str, np.ndarray] = {}

    def op(self, op_type, *inputs, outputs=1, domain="", name=None, **attrs):
        """Add a node; `outputs` is a count or a list of names. Returns the output name(s)."""
        self.count += 1
        prefix = name or f"{op_type.lower()}_{self.count}"
        if isinstance(outputs, int):
            outputs = [f"{prefix}_out"] if outputs == 1 else [f"{prefix}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=f"{prefix}_{self.count}",
                                           domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def const(self, name, array: np.ndarray) -> str:
        """A Constant node named `name`, made once (later calls with the same value return it)."""
        if name in self.consts:
            assert np.array_equal(self.consts[name], array), f"constant {name!r} made again with another value"
        else:
            self.consts[name] = array
            self.nodes.append(helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array, name)))
        return name


def graph_section(config: PersimmonConfig, dtype: str, kv_capacity: int, cache_layout: str,
                  kv_cache: str | None = None) -> GraphSection:
    """The manifest's `onnx` section for this graph: files, I/O, cache aliases, layout, custom ops;
    kv_cache "int8": int8 caches (else in dtype)."""
    length = "kv_length" if cache_layout == "whole" else kv_capacity
    cache_shape = ["batch", config.num_attention_heads, length, config.head_dim]
    names = STEP_INPUTS[cache_layout]
    inputs = [TensorSpec(name, "int64", STEP_INPUT_SHAPES[name]) for name in names]
    logits_shape = ["batch", 1, config.vocab_size] if "first_slot" not in names else ["batch", config.vocab_size]
    outputs = [TensorSpec("logits", "float32", logits_shape)]
    aliases = {}
    for layer in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(TensorSpec(f"past_{kind}_{layer}", kv_cache or dtype, cache_shape))
            outputs.append(TensorSpec(f"present_{kind}_{layer}", kv_cache or dtype, cache_shape))
            aliases[f"present_{kind}_{layer}"] = f"past_{kind}_{layer}"
    ops = [QK_LAYERNORM_OP, ROTARY_OP] if config.qk_layernorm else [ROTARY_OP]
    return GraphSection(file=MODEL_FILE, data_file=DATA_FILE, cache_layout=cache_layout,
                        custom_ops=CustomOps(CUSTOM_OP_DOMAIN, CUSTOM_OP_VERSION, ops),
                        inputs=inputs, outputs=outputs, cache_aliases=aliases)


def value_info(spec: TensorSpec):
    elem = {"int64": TensorProto.INT64, KV_CACHE_INT8: TensorProto.INT8, **ONNX_DTYPES}[spec.dtype]
    return helper.make_tensor_value_info(spec.name, elem, spec.shape)


def build_graph(config: PersimmonConfig, dtype: str, kv_capacity: int, cache_layout: str = "window",
                weights: WeightFormat | None = None, prefill: WeightFormat | None = None,
                kv_scales: list | None = None) -> onnx.GraphProto:
    """The step graph, with initializers left out (the caller adds them as external data).
    `weights`: the int8/int4 format of the linear weights it names (None: stored in dtype);
    `prefill`: the prefill graph's format, which takes precedence for the weights it names;
    `kv_scales`: per layer (key, value) scales [heads, head_dim] of an int8 cache (`kv_cache_scales`)."""
    _check_layout(config, kv_capacity, cache_layout)
    step = _StepGraph(config, dtype, kv_capacity, cache_layout, weights, prefill, kv_scales)
    x = step.g.op("Gather", "model.embed_tokens.weight", "input_ids", name="embed")
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        h = step.g.op("Add", x, step.attention(step.layer_norm(x, f"{p}.input_layernorm"), layer))
        x = step.g.op("Add", h, step.mlp(step.layer_norm(h, f"{p}.post_attention_layernorm"), p), name=f"{p}.out")
    step.logits(x)
    section = graph_section(config, dtype, kv_capacity, cache_layout, KV_CACHE_INT8 if kv_scales else None)
    return helper.make_graph(step.g.nodes, "persimmon_step", [value_info(s) for s in section.inputs],
                             [value_info(s) for s in section.outputs])


def _check_layout(config: PersimmonConfig, kv_capacity: int, cache_layout: str) -> None:
    if cache_layout not in CACHE_LAYOUTS:
        raise ExportError(f"cache layout {cache_layout!r} is not one of {tuple(CACHE_LAYOUTS)}")
    if cache_layout == "capacity" and config.head_dim % HEAD_DIM_MULTIPLE:
        raise ExportError(f"cache layout 'capacity' needs a head_dim that is a multiple of {HEAD_DIM_MULTIPLE} "
                          f"(onnxruntime's GroupQueryAttention), got {config.head_dim}: use cache layout 'whole'")
    if config.rope_scaling_type == "dynamic" and kv_capacity > config.max_position_embeddings:
        # dynamic NTK raises the rope base once a position reaches max_position_embeddings; below
        # that its frequencies are the unscaled ones, so a build that cannot get there is exact
        raise ExportError(f"rope_scaling 'dynamic' is exported only with --kv-capacity <= max_position_embeddings "
                          f"({config.max_position_embeddings}), got --kv-capacity {kv_capacity}: past it the "
                          f"frequencies change with the sequence length")


class _StepGraph:
    """The step graph's parts, in the order `build_graph` appends them: positions and rotary tables
    (shared by every layer, made here), then per layer attention and MLP, then the logits."""

    def __init__(self, config: PersimmonConfig, dtype: str, kv_capacity: int, cache_layout: str,
                 weights: WeightFormat | None, prefill: WeightFormat | None, kv_scales: list | None = None):
        self.g = g = _GraphBuilder()
        self.kv_scales = kv_scales
        self.config, self.cache_layout, self.formats = config, cache_layout, (prefill, weights)
        self.f32, self.act, self.half = TensorProto.FLOAT, ONNX_DTYPES[dtype], dtype != "float32"
        self.quantized_shapes = linear_shapes(config)
        heads, head_dim = config.num_attention_heads, config.head_dim
        # dims via Shape + Gather: the opset-15 start/end attributes of Shape are not relied upon
        self.one, zero = g.const("one", np.array(1, np.int64)), g.const("zero", np.array(0, np.int64))
        self.axes = axes = {k: g.const(f"axes_{k}", np.array(v, np.int64)) for k, v in
                            {"0": [0], "1": [1], "2": [2], "01": [0, 1]}.items()}
        seq = g.op("Gather", g.op("Shape", "input_ids"), self.one, axis=0, name="seq_len")  # scalar
        steps = g.op("Unsqueeze", g.op("Range", zero, seq, self.one), axes["0"])  # [1, T]: 0 .. T-1
        if cache_layout == "capacity":  # the mask places each row's tokens: see _mask_places_tokens
            positions, kv_length = self._mask_places_tokens(seq, steps)
            self.lengths = gqa_lengths(g, self.reach, kv_length, self.one)
        else:
            positions = g.op("Add", g.op("Unsqueeze", "first_slot", axes["1"]), steps, name="positions")  # [B, T]
            self.kv_length = g.op("Gather", g.op("Shape", "attention_mask"), axes["1"], axis=0, name="kv_length")
            slots = g.op("Range", zero, g.op("Squeeze", self.kv_length), self.one, name="slots")  # [kv]
            causal = g.op("LessOrEqual", g.op("Unsqueeze", slots, axes["01"]),
                          g.op("Unsqueeze", positions, axes["2"]))
            filled = g.op("Cast", g.op("Unsqueeze", "attention_mask", axes["1"]), to=TensorProto.BOOL)
            self.allowed = g.op("Unsqueeze", g.op("And", causal, filled), axes["1"], name="allowed")  # [B, 1, T, kv]
            self.masked_score = g.const("masked_score", np.array(np.finfo(np.float32).min, np.float32))
            self.q_scale = g.const("q_scale", np.array(head_dim ** -0.5, dtype=NUMPY_DTYPES[dtype]))
        # the longest sequence this build holds is kv_capacity: for dynamic scaling, the unscaled frequencies
        inv_freq = g.const("inv_freq", rope_inv_freq(config, kv_capacity).numpy().astype(np.float32))
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=self.f32), axes["2"]), inv_freq)
        angles = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), axes["2"], name="angles")  # [B, T, 1, rot]
        self.cos, self.sin = g.op("Cos", angles, name="cos"), g.op("Sin", angles, name="sin")
        self.head_shape = g.const("head_shape", np.array([0, 0, heads, 3, head_dim], np.int64))
        self.hidden_shape = g.const("hidden_shape", np.array([0, 0, config.hidden_size], np.int64))
        self.qkv_index = [g.const(f"qkv_{i}", np.array(i, np.int64)) for i in range(3)]

    def _mask_places_tokens(self, seq: str, steps: str) -> tuple[str, str]:
        """(positions [B, T], kv_length scalar) from attention_mask alone, as onnxruntime-genai feeds
        it (and as its own model builder reads it); also each row's reach (self.reach [B]) and last
        real token (self.last_token [B], in 0..T-1).

        A row holds as many tokens as its mask has 1s (its reach), in slots 0 .. reach - 1: its new
        tokens fill the T slots before its reach, or slots 0 .. T-1 when it holds fewer (a first
        step right-padded, whose padding the next tokens overwrite). A position is its slot.
        GroupQueryAttention reads each row's first `reach` slots and no mask values, so the mask's
        0s count only as absent tokens: a row is right-padded, never left-padded."""
        g, axes = self.g, self.axes
        mask = "attention_mask"
        self.reach = g.op("ReduceSum", mask, axes["1"], keepdims=0, name="row_reach")  # [B]
        first = g.op("Max", g.op("Sub", self.reach, seq), g.const("zero", np.array(0, np.int64)),
                     name="row_first_slot")  # [B]
        self.last_token = g.op("Sub", g.op("Sub", self.reach, first), self.one, name="row_last_token")  # [B]
        positions = g.op("Add", g.op("Unsqueeze", first, axes["1"]), steps, name="positions")  # [B, T]
        kv_length = g.op("Gather", g.op("Shape", mask), self.one, axis=0, name="kv_length")  # scalar
        return positions, kv_length

    def layer_norm(self, x: str, prefix: str) -> str:
        """LayerNorm with fp32 statistics, whatever the activations' dtype."""
        g = self.g
        x32 = g.op("Cast", x, to=self.f32) if self.half else x
        y = g.op("LayerNormalization", x32, f"{prefix}.weight", f"{prefix}.bias", axis=-1,
                 epsilon=self.config.layer_norm_eps)
        return g.op("Cast", y, to=self.act) if self.half else y

    def matmul(self, x: str, weight: str) -> str:
        fmt = next((f for f in self.formats if f is not None and f.quantizes(weight)), None)
        if fmt is not None:
            suffix = next(s for s in self.quantized_shapes if weight.endswith(s))
            return emit_matmul(self.g, x, weight, fmt, *self.quantized_shapes[suffix], half=self.half)
        return self.g.op("MatMul", x, weight)

    def linear(self, x: str, prefix: str) -> str:
        return self.g.op("Add", self.matmul(x, f"{prefix}.weight"), f"{prefix}.bias")

    def attention(self, x: str, layer: int) -> str:
        """Fused QKV, QK-LayerNorm, partial rotary, the cache update and attention, the output dense."""
        g, config, p = self.g, self.config, f"model.layers.{layer}"
        # [B, T, heads, (q, k, v), head_dim]: the fused output is interleaved per head
        qkv = g.op("Reshape", self.linear(x, f"{p}.self_attn.query_key_value"), self.head_shape)
        q, k, v = (g.op("Gather", qkv, index, axis=3) for index in self.qkv_index)
        if config.qk_layernorm:
            q, k = g.op(QK_LAYERNORM_OP, q, k, f"{p}.self_attn.q_layernorm.weight", f"{p}.self_attn.q_layernorm.bias",
                        f"{p}.self_attn.k_layernorm.weight", f"{p}.self_attn.k_layernorm.bias",
                        outputs=2, domain=CUSTOM_OP_DOMAIN, name=f"{p}.qk_layernorm", epsilon=config.layer_norm_eps,
                        plugin_version=PLUGIN_VERSION, plugin_namespace=CUSTOM_OP_DOMAIN)
        q, k = (g.op(ROTARY_OP, t, self.cos, self.sin, domain=CUSTOM_OP_DOMAIN, name=f"{p}.rotary_{n}",
                     plugin_version=PLUGIN_VERSION, plugin_namespace=CUSTOM_OP_DOMAIN) for t, n in ((q, "q"), (k, "k")))
        if self.cache_layout == "capacity":  # onnxruntime: one fused op writes the caches and attends
            scales = None if self.kv_scales is None else [  # [1, heads, 1, head_dim]: one per channel
                g.const(f"{p}.self_attn.{kind}_cache_scale", scale[None, :, None, :].astype(np.float32))
                for kind, scale in zip(("key", "value"), self.kv_scales[layer])]
            attn = grouped_query_attention(g, q, k, v, layer, self.lengths, self.hidden_shape,
                                           config.num_attention_heads, config.head_dim, scales)
        else:
            attn = self._masked_attention(q, k, v, layer)
        return self.linear(attn, f"{p}.self_attn.dense")

    def _masked_attention(self, q: str, k: str, v: str, layer: int) -> str:
        """TensorScatter writes the new keys and values into the caches; softmax over the allowed slots."""
        g, axes, p = self.g, self.axes, f"model.layers.{layer}"
        q, k, v = (g.op("Transpose", t, perm=[0, 2, 1, 3]) for t in (q, k, v))  # [B, heads, T, head_dim]
        caches = []
        for kind, new in (("key", k), ("value", v)):
            present = g.op("TensorScatter", f"past_{kind}_{layer}", new, "first_slot", axis=-2,
                           outputs=[f"present_{kind}_{layer}"], name=f"{p}.cache_update_{kind}")
            caches.append(g.op("Slice", present, axes["0"], self.kv_length, axes["2"])
                          if self.cache_layout == "window" else present)
        scores = g.op("MatMul", g.op("Mul", q, self.q_scale), g.op("Transpose", caches[0], perm=[0, 1, 3, 2]))
        scores = g.op("Where", self.allowed, g.op("Cast", scores, to=self.f32) if self.half else scores,
                      self.masked_score)
        probs = g.op("Softmax", scores, axis=-1)
        probs = g.op("Cast", probs, to=self.act) if self.half else probs
        return g.op("Reshape", g.op("Transpose", g.op("MatMul", probs, caches[1]), perm=[0, 2, 1, 3]),
                    self.hidden_shape)

    def mlp(self, x: str, prefix: str) -> str:
        hidden = self._activation(self.linear(x, f"{prefix}.mlp.dense_h_to_4h"))
        return self.linear(hidden, f"{prefix}.mlp.dense_4h_to_h")

    def _activation(self, x: str) -> str:
        g, kind = self.g, self.config.hidden_act
        if kind == "relu2":
            relu = g.op("Relu", x)
            return g.op("Mul", relu, relu)
        if kind == "relu":
            return g.op("Relu", x)
        if kind == "silu":
            return g.op("Mul", x, g.op("Sigmoid", x))
        return g.op("Gelu", x, approximate="tanh" if kind == "gelu_pytorch_tanh" else "none")

    def logits(self, x: str) -> None:
        """fp32 logits of each row's last new token, after the final LayerNorm: [B, 1, vocab] for a
        `capacity` graph (what onnxruntime-genai reads as last-token logits), else [B, vocab]."""
        g = self.g
        capacity = self.cache_layout == "capacity"
        index = self.last_token if capacity else g.op("Sub", "token_count", self.one)  # [B]
        # the final LayerNorm over every token: classify.py's heads read it whole
        final = g.op("GatherND", self.layer_norm(x, "model.final_layernorm"), g.op("Unsqueeze", index, self.axes["1"]),
                     batch_dims=1)  # [B, hidden]
        if capacity:
            final = g.op("Unsqueeze", final, self.axes["1"])  # [B, 1, hidden]
        logits = self.matmul(final, "lm_head.weight")
        if self.half:
            g.op("Cast", logits, to=self.f32, outputs=["logits"])
        else:
            g.op("Identity", logits, outputs=["logits"])


def kv_cache_scales(measured) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (key, value) scales [heads, head_dim] of an int8 cache: the channel's largest |x|
    on the calibration prompts, times KV_CACHE_MARGIN (later text may go higher; past it a value
    saturates at +-127), over 127. A channel never seen nonzero gets a scale of 1e-6."""
    return [tuple(np.maximum(channels * KV_CACHE_MARGIN / 127.0, 1e-6).astype(np.float32)
                  for channels in (keys, values))
            for keys, values in zip(measured.key_channels, measured.value_channels)]


def onnx_layout(name: str, dtype: str) -> tuple[torch.dtype, bool]:
    """How a checkpoint tensor is stored in the graph: (target dtype, transpose?).

    Linear weights are stored [in, out] so MatMul takes them as they are; LayerNorm parameters
    stay fp32. The MLP's relu^2 scale comes from `Relu2Scales`.
    """
    target = torch.float32 if "layernorm" in name else TORCH_DTYPES[dtype]
    return target, name.endswith(_LINEAR)


def relu2_scale(w2_largest: float, dtype: str) -> float:
    """The largest power of two s <= RELU2_SCALE[dtype] with w2_largest * s^2 <= RELU2_WEIGHT_LIMIT,
    or 1. Powers of two keep W1/s and W2*s^2 exact; a W2 that fp16 cannot hold even at s = 1 is
    refused by the writer, which checks every tensor it stores."""
    s = RELU2_SCALE[dtype]
    while s > 1 and not w2_largest * s * s <= RELU2_WEIGHT_LIMIT:  # `not <=`: a NaN maximum ends at 1
        s /= 2
    return s


class Relu2Scales:
    """Chooses each layer's relu^2 scale from its dense_4h_to_h.weight and applies it to the stream.

    Per layer rather than one for the model: the scale lives in the weights only (the graph is the
    same for any s), so each layer keeps the largest s its own W2 allows and one large weight lowers
    the relu^2 range of its layer alone. A layer's W1 and b1 need its s, so they wait until its W2
    has passed: a safetensors file lists names sorted, W2 (dense_4h_to_h) before W1 (dense_h_to_4h),
    so at most a layer split across two shards waits; a pytorch_model.bin (module order, W1 first)
    keeps one layer's W1 and b1 waiting, tensors its loader already holds.
    """

    def __init__(self, config: PersimmonConfig, dtype: str, measured=None):
        self.active = config.hidden_act == "relu2" and RELU2_SCALE[dtype] != 1.0
        self.dtype = dtype
        self.measured = measured  # ranges.Measured: the fp32 reference's maxima, or None
        self.scales: dict[str, float] = {}  # "model.layers.{i}" -> s
        self.waiting: dict[str, list[tuple[str, torch.Tensor]]] = {}

    def ready(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor, float]]:
        """The (name, tensor, factor) to write now that `name` has arrived (none while it waits)."""
        layer, _, part = name.partition(".mlp.")
        if not self.active or not part.startswith(("dense_4h_to_h.weight", "dense_h_to_4h.")):
            return [(name, tensor, 1.0)]
        if part == "dense_4h_to_h.weight":
            s = self.scales[layer] = self._choose(name, tensor)
            return [(name, tensor, s * s)] + [(n, t, 1.0 / s) for n, t in self.waiting.pop(layer, [])]
        if layer not in self.scales:
            self.waiting.setdefault(layer, []).append((name, tensor))
            return []
        return [(name, tensor, 1.0 / self.scales[layer])]

    def _choose(self, name: str, w2: torch.Tensor) -> float:
        low, high = torch.aminmax(w2)  # one pass, no |w2| copy (a layer's W2 is 128 MiB at 8B)
        largest = max(-float(low), float(high))
        s = relu2_scale(largest, self.dtype)
        if self.measured is not None:  # the measured activations must fit at this s too
            self.measured.check_relu2_scale(int(name.split(".")[2]), s)
        if s < RELU2_SCALE[self.dtype]:
            log.warning(f"{name}: values up to {largest:.4g}, so this layer's relu^2 scale is {s:g}, not "
                        f"{RELU2_SCALE[self.dtype]:g}: its MLP pre-activations overflow {self.dtype} past {256 * s:g}")
        return s

    def close(self) -> None:
        """Say which scales were chosen; refuse if a W1 never met its W2."""
        if self.waiting:
            layer = next(iter(self.waiting))
            raise ExportError(f"{layer}.mlp.dense_4h_to_h.weight is missing from the weights: no relu^2 scale "
                              f"for {layer}.mlp.dense_h_to_4h")
        if self.scales:
            counts = {s: sum(v == s for v in self.scales.values()) for s in sorted(set(self.scales.values()))}
            log.info("relu^2 scale per layer: " + ", ".join(f"{s:g} in {n} layer(s)" for s, n in counts.items()))


class DataWriter:
    """Appends tensors to the external data file (64-byte aligned) and hashes what it writes."""

    def __init__(self, path: str):
        self.file = open(path, "wb")
        self.location = os.path.basename(path)
        self.offset = 0
        self.sha256 = hashlib.sha256()
        self.largest: dict[str, float] = {}  # name -> max |x| as stored, for tensors stored in fp16

    def write(self, data) -> None:
        self.file.write(data)
        self.sha256.update(data)
        self.offset += len(data)

    def begin(self) -> int:
        """Pad to the alignment; the offset where the next tensor starts."""
        pad = -self.offset % _ALIGN
        if pad:
            self.write(bytes(pad))
        return self.offset

    def external(self, name: str, dims: list, data_type: int, start: int) -> TensorProto:
        """The initializer for what was written since `start`."""
        proto = TensorProto(name=name, dims=dims, data_location=TensorProto.EXTERNAL, data_type=data_type)
        for key, value in (("location", self.location), ("offset", str(start)), ("length", str(self.offset - start))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def add(self, name: str, tensor: torch.Tensor, target: torch.dtype, transpose: bool, scale: float,
            chunk_elements: int = 1 << 26) -> TensorProto:
        start = self.begin()
        source = tensor.T if transpose else tensor
        rows = max(1, chunk_elements // max(1, source[0].numel())) if source.dim() > 1 else source.shape[0]
        for i in range(0, source.shape[0], rows):  # chunks bound the memory of cast + transpose
            chunk = source[i:i + rows].float()
            if scale != 1.0:
                chunk = chunk * scale
            stored = chunk.to(target).contiguous()
            low, high = torch.aminmax(chunk) if chunk.numel() else (torch.tensor(0.0), torch.tensor(0.0))
            if not _finite_when_stored(low, high, stored):  # the served model would compute NaN/inf from here on
                _refuse_non_finite(name, source[i:i + rows], target, scale)
            if target == torch.float16:
                self.largest[name] = max(self.largest.get(name, 0.0), -float(low), float(high))
            self.write_tensor(stored)
        return self.external(name, list(source.shape), _ONNX_TYPES[target], start)

    def add_stored(self, name: str, tensor: torch.Tensor) -> TensorProto:
        """A float tensor already in the dtype and layout the graph reads (e.g. quantization scales)."""
        start = self.begin()
        self.write_tensor(tensor)
        return self.external(name, list(tensor.shape), _ONNX_TYPES[tensor.dtype], start)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        # numpy has no bfloat16: its bytes are written through a 16-bit integer view
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        self.write(memoryview(raw.numpy()).cast("B"))

    def close(self) -> None:
        self.file.close()


def _write_weight(writer: DataWriter, name: str, tensor: torch.Tensor, dtype: str, factor: float,
                  weights: WeightFormat | None) -> list[TensorProto]:
    """Write one checkpoint tensor as the build stores it: int8/int4 codes and scales for the
    linear weights `weights` quantizes, else `onnx_layout`'s dtype and layout."""
    if weights is not None and weights.quantizes(name):
        return write_quantized(writer, name, tensor, weights, TORCH_DTYPES[dtype], factor)
    target, transpose = onnx_layout(name, dtype)
    return [writer.add(name, tensor, target, transpose, factor)]


def write_tensors(graph: onnx.GraphProto, writer: DataWriter, tensors: Iterable[tuple[str, torch.Tensor]],
                  dtype: str, relu2: Relu2Scales, step: Steps, weights: WeightFormat | None = None,
                  tied_lm_head: bool = False, prefill: "_PrefillWriter | None" = None) -> None:
    """Write each checkpoint tensor as the build stores it (`_write_weight`, each MLP at its relu^2
    scale) and add it to the graph's initializers; tied_lm_head: the embedding table again as lm_head.
    `prefill`: also write the prefill graph's int8 copy of the weights its format names."""
    def write(name, tensor, factor):
        graph.initializer.extend(_write_weight(writer, name, tensor, dtype, factor, weights))
        if prefill is not None and prefill.format.quantizes(name):
            prefill.initializers.extend(write_quantized(prefill.writer, name, tensor, prefill.format, torch.float32,
                                                        factor))

    for name, tensor in tensors:
        for ready, ready_tensor, factor in relu2.ready(name, tensor):
            write(ready, ready_tensor, factor)
        if tied_lm_head and name == "model.embed_tokens.weight":
            write("lm_head.weight", tensor, 1.0)
        log.debug(f"{name}: {tuple(tensor.shape)} {tensor.dtype}")
        step(f"{writer.offset / 2**30:.2f} GiB written")
    relu2.close()


def _finite_when_stored(low: torch.Tensor, high: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether no NaN/inf was read or made by the cast, given the fp32 chunk's aminmax. One aminmax
    pass (NaN propagates, inf and overflow show as extremes) is ~10x cheaper than isfinite on
    fp16 on CPU; only a range past the target's finite limits is checked element-wise."""
    limits = torch.finfo(stored.dtype)
    return bool(limits.min <= low and high <= limits.max) or bool(torch.isfinite(stored).all())


def _refuse_non_finite(name: str, original: torch.Tensor, target: torch.dtype, scale: float) -> None:
    """Say whether the checkpoint holds NaN/inf or its values overflow the build's dtype."""
    bad = int((~torch.isfinite(original)).sum())
    if bad:
        raise ExportError(f"checkpoint tensor {name!r} holds at least {bad} NaN/inf value(s); the checkpoint is "
                          f"corrupt (or training diverged): refusing to build a model that computes garbage")
    largest = float(original.float().abs().max())
    scaled = f" (x{scale:g}, the relu^2 scaling)" if scale != 1.0 else ""
    raise ExportError(f"checkpoint tensor {name!r} has values up to {largest:.4g}, beyond {target} once "
                      f"stored{scaled}; build with --dtype bfloat16 (for TensorRT) or --dtype float32")


@dataclasses.dataclass
class _PrefillWriter:
    """The prefill graph's int8 weights as they are written (`write_tensors`)."""
    format: WeightFormat
    writer: DataWriter
    initializers: list = dataclasses.field(default_factory=list)


def export_onnx(config: PersimmonConfig, tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str,
                dtype: str = "float16", kv_capacity: int = 4096, cache_layout: str = "window",
                measured=None, weights: WeightFormat | None = None,
                prefill: WeightFormat | None = None, kv_cache: str | None = None) -> tuple[GraphSection, dict]:
    """Write out_dir/model.onnx + model.onnx.data; return the manifest's `onnx` section and the
    files written ({name: FileEntry}).

    `tensors` streams (name, tensor) in checkpoint names, e.g. `checked_tensors(...)`. `measured`
    (a `ranges.Measured`, float16 only) also bounds each layer's relu^2 scale and receives what was
    stored: `measured.scales` (per layer) and `measured.weights` (max |W| per fp16 tensor).
    `weights` (`quantize.weight_format`): store the linear weights it names as int8/int4.
    `prefill` (`quantize.prefill_format`): also write prefill.onnx + prefill.onnx.data, the same
    step with int8 x int8 linears, reading every other tensor from model.onnx.data.
    `kv_cache` "int8": int8 caches, scaled per channel from `measured` (`kv_cache_scales`).
    """
    if dtype not in ONNX_DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {sorted(ONNX_DTYPES)}")
    if prefill is not None and cache_layout != "capacity":
        raise ExportError(f"a prefill graph is written for cache layout 'capacity' (onnxruntime builds), not "
                          f"{cache_layout!r}")
    kv_scales = None if kv_cache is None else kv_cache_scales(measured)
    graph = build_graph(config, dtype, kv_capacity, cache_layout, weights, kv_scales=kv_scales)
    writer = DataWriter(os.path.join(out_dir, DATA_FILE))
    second = None if prefill is None else _PrefillWriter(prefill, DataWriter(os.path.join(out_dir, PREFILL_DATA_FILE)))
    expected = 4 + 12 * config.num_hidden_layers + (4 if config.qk_layernorm else 0) * config.num_hidden_layers
    step = Steps(log, "weights", expected, "tensors", every=25)
    relu2 = Relu2Scales(config, dtype, measured)
    try:
        write_tensors(graph, writer, tensors, dtype, relu2, step, weights, tied_lm_head=config.tie_word_embeddings,
                      prefill=second)
        if measured is not None:
            measured.weights = writer.largest
            measured.scales = [relu2.scales.get(f"model.layers.{i}", 1.0) for i in range(config.num_hidden_layers)]
    finally:
        step.close()
        writer.close()
        if second is not None:
            second.writer.close()
    section = graph_section(config, dtype, kv_capacity, cache_layout, kv_cache)
    if second is None:
        return save_model(graph, out_dir, writer, section)
    prefill_graph = build_graph(config, dtype, kv_capacity, cache_layout, prefill=prefill, kv_scales=kv_scales)
    used = {name for node in prefill_graph.node for name in node.input}
    replaced = {tensor.name for tensor in second.initializers}
    prefill_graph.initializer.extend([tensor for tensor in graph.initializer  # the same bytes of model.onnx.data
                                      if tensor.name in used and tensor.name not in replaced])
    prefill_graph.initializer.extend(second.initializers)
    _, prefill_files = save_model(prefill_graph, out_dir, second.writer, section, PREFILL_FILE)
    section, files = save_model(graph, out_dir, writer, section)
    return section, {**files, **prefill_files}


def save_model(graph: onnx.GraphProto, out_dir: str, writer: DataWriter, section: GraphSection,
               model_file: str = MODEL_FILE) -> tuple[GraphSection, dict]:
    """Save out_dir/`model_file` (with the custom ops' functions, the lowest opsets and IR version
    its ops need), check it with onnx.checker; return `section` with those versions recorded and the
    files written with `writer`'s data ({name: FileEntry})."""
    model = helper.make_model(graph, functions=custom_op_functions(), producer_name="persimmon-export",
                              opset_imports=[helper.make_opsetid("", BASE_OPSET),
                                             helper.make_opsetid(CUSTOM_OP_DOMAIN, CUSTOM_OP_VERSION)])
    add_contrib_opset(model)  # where used: MatMulNBits, the `capacity` layout's GroupQueryAttention
    section = dataclasses.replace(section, **declare_versions(model))
    model_path = os.path.join(out_dir, model_file)
    onnx.save(model, model_path)
    log.info(f"checking {model_file} (onnx.checker full check, shape inference) ...")
    try:
        onnx.checker.check_model(model_path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{model_path}: the exported graph fails onnx.checker: {e}") from None
    data_path = os.path.join(out_dir, writer.location)
    return section, {model_file: FileEntry(os.path.getsize(model_path), sha256_file(model_path)),
                     writer.location: FileEntry(os.path.getsize(data_path), writer.sha256.hexdigest())}
