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

`epsilon` is a 1-element float32 array, not a `float`: tensorrt.plugin's creator rebuilds a
builtin attribute as `float(field.data)`, and the parser's field data is a (1,)-shaped array,
which numpy >= 2.4 refuses to convert to a scalar (every plugin creation failed); an array
attribute it rebuilds with `field.data.astype(dtype)`, which works on every numpy.
"""

from typing import Tuple, Union

import numpy as np
import numpy.typing as npt
import tensorrt as trt
import tensorrt.plugin as trtp

from persimmon_runtime.custom_ops import CUSTOM_OP_DOMAIN as NAMESPACE
from persimmon_runtime.custom_ops import PLUGIN_VERSION, QK_LAYERNORM_OP, ROTARY_OP

from . import KERNELS
from .compile import plugin_ptx

WARPS_PER_BLOCK = 4
THREADS_PER_BLOCK = 256
_STORAGE = {int(trt.float16): "float16", int(trt.float32): "float32"}


def _kernel_name(op: str, dtype) -> str:
    """The kernel for a tensor's dtype (a trt.DataType, or its number as a TensorDesc may give it)."""
    if int(dtype) not in _STORAGE:
        raise ValueError(f"{op}: no kernel for {dtype_name(dtype)} tensors; the plugins have float16 and float32 "
                         f"kernels (build --plugins off for other dtypes)")
    return KERNELS[op][1][_STORAGE[int(dtype)]]


def dtype_name(dtype) -> str:
    """'BF16' for trt.bfloat16 or its number 7 (messages once said 'no kernel for 7')."""
    names = {int(value): name for name, value in trt.DataType.__members__.items()}
    return names.get(int(dtype), str(dtype))


def epsilon_bits(epsilon: np.ndarray) -> int:
    """The float32 epsilon's bits as the int32 the kernel takes (AOT scalars are int32 only)."""
    return int(np.asarray(epsilon, np.float32).reshape(-1)[:1].view(np.int32)[0])


def create_as_the_parser_does(op: str):
    """Create `op`'s plugin from its registry creator with the fields TensorRT's ONNX parser makes
    from an exported node (one-element arrays), for the AOT build: what `doctor` tries, so that a
    creation failure shows there and not first in a build. Raises what the creator raises."""
    fields = {QK_LAYERNORM_OP: [trt.PluginField("epsilon", np.array([1e-5], np.float32), trt.PluginFieldType.FLOAT32)],
              ROTARY_OP: []}[op]
    creator = trt.get_plugin_registry().get_creator(op, PLUGIN_VERSION, NAMESPACE)
    if creator is None:
        raise LookupError(f"{NAMESPACE}::{op} is not in TensorRT's plugin registry")
    request = getattr(trt, "QuickPluginCreationRequest", None)  # AOT plugins: TensorRT >= 10.9
    extra = [request.STRICT_AOT] if request is not None else []
    plugin = creator.create_plugin(op, NAMESPACE, trt.PluginFieldCollection(fields), trt.TensorRTPhase.BUILD, *extra)
    if plugin is None:
        raise RuntimeError(f"{NAMESPACE}::{op}: its creator returned no plugin")
    return plugin


@trtp.register(f"{NAMESPACE}::{QK_LAYERNORM_OP}")
def qk_layernorm_desc(query: trtp.TensorDesc, key: trtp.TensorDesc, q_weight: trtp.TensorDesc,
                      q_bias: trtp.TensorDesc, k_weight: trtp.TensorDesc, k_bias: trtp.TensorDesc,
                      epsilon: npt.NDArray[np.float32]) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    return query.like(), key.like()


@trtp.aot_impl(f"{NAMESPACE}::{QK_LAYERNORM_OP}")
def qk_layernorm_aot(query: trtp.TensorDesc, key: trtp.TensorDesc, q_weight: trtp.TensorDesc,
                     q_bias: trtp.TensorDesc, k_weight: trtp.TensorDesc, k_bias: trtp.TensorDesc,
                     epsilon: npt.NDArray[np.float32], outputs: Tuple[trtp.TensorDesc], tactic: int
                     ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    shape = query.shape_expr  # [batch, seq, heads, head_dim]
    rows = shape[0] * shape[1] * shape[2]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(rows * 2, WARPS_PER_BLOCK)  # one warp per row of q, then of k
    launch.block_x = 32 * WARPS_PER_BLOCK
    scalars = trtp.SymIntExprs(3)
    scalars[0], scalars[1] = trtp.SymInt32(rows), trtp.SymInt32(shape[3])
    scalars[2] = trtp.SymInt32(epsilon_bits(epsilon))
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
