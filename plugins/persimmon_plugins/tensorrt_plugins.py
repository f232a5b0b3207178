"""TensorRT plugins for the two custom ops: Python-defined ("quickly deployable") plugins with
ahead-of-time kernels (TensorRT >= 10.9).

Importing this module registers `persimmon::PersimmonQKLayerNorm` and
`persimmon::PersimmonPartialRotary` in TensorRT's plugin registry; the ONNX parser then imports
the exported nodes (which carry plugin_namespace="persimmon") as these plugins instead of
inlining their function bodies. The builder calls the `aot_impl` functions and embeds the
returned PTX in the engine, so the engine runs with no Python and no plugin library. Kernel arguments follow TensorRT's AOT convention: input pointers,
int32 scalars, output pointers.

No `from __future__ import annotations` here: tensorrt.plugin reads these signatures with
issubclass() on each annotation, so they must be the classes themselves, not strings.
"""

import struct
from typing import Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from persimmon_runtime.custom_ops import CUSTOM_OP_DOMAIN as NAMESPACE
from persimmon_runtime.custom_ops import QK_LAYERNORM_OP, ROTARY_OP

from . import KERNELS
from .compile import plugin_ptx

WARPS_PER_BLOCK = 4
THREADS_PER_BLOCK = 256
_STORAGE = {trt.float16: "float16", trt.float32: "float32"}


def _kernel_name(op: str, dtype) -> str:
    if dtype not in _STORAGE:
        raise ValueError(f"{op}: no kernel for {dtype}; the plugins run float16 and float32 graphs")
    return KERNELS[op][1][_STORAGE[dtype]]


@trtp.register(f"{NAMESPACE}::{QK_LAYERNORM_OP}")
def qk_layernorm_desc(query: trtp.TensorDesc, key: trtp.TensorDesc, q_weight: trtp.TensorDesc,
                      q_bias: trtp.TensorDesc, k_weight: trtp.TensorDesc, k_bias: trtp.TensorDesc,
                      epsilon: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    return query.like(), key.like()


@trtp.aot_impl(f"{NAMESPACE}::{QK_LAYERNORM_OP}")
def qk_layernorm_aot(query: trtp.TensorDesc, key: trtp.TensorDesc, q_weight: trtp.TensorDesc,
                     q_bias: trtp.TensorDesc, k_weight: trtp.TensorDesc, k_bias: trtp.TensorDesc, epsilon: float,
                     outputs: Tuple[trtp.TensorDesc], tactic: int
                     ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    shape = query.shape_expr  # [batch, seq, heads, head_dim]
    rows = shape[0] * shape[1] * shape[2]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(rows * 2, WARPS_PER_BLOCK)  # one warp per row of q, then of k
    launch.block_x = 32 * WARPS_PER_BLOCK
    eps_bits = struct.unpack("<i", struct.pack("<f", epsilon))[0]  # AOT scalars are int32 only
    scalars = trtp.SymIntExprs(3)
    scalars[0], scalars[1], scalars[2] = trtp.SymInt32(rows), trtp.SymInt32(shape[3]), trtp.SymInt32(eps_bits)
    return _kernel_name(QK_LAYERNORM_OP, query.dtype), plugin_ptx(QK_LAYERNORM_OP), launch, scalars


@trtp.register(f"{NAMESPACE}::{ROTARY_OP}")
def partial_rotary_desc(x: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc) -> trtp.TensorDesc:
    return x.like()


@trtp.aot_impl(f"{NAMESPACE}::{ROTARY_OP}")
def partial_rotary_aot(x: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc,
                       outputs: Tuple[trtp.TensorDesc], tactic: int
                       ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    shape = x.shape_expr  # [batch, seq, heads, head_dim]; cos/sin: [batch, seq, 1, rotary_dims]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(shape.numel(), THREADS_PER_BLOCK)
    launch.block_x = THREADS_PER_BLOCK
    scalars = trtp.SymIntExprs(4)
    scalars[0] = trtp.SymInt32(shape[0] * shape[1])
    scalars[1], scalars[2], scalars[3] = (trtp.SymInt32(shape[2]), trtp.SymInt32(shape[3]),
                                          trtp.SymInt32(cos.shape_expr[3]))
    return _kernel_name(ROTARY_OP, x.dtype), plugin_ptx(ROTARY_OP), launch, scalars
