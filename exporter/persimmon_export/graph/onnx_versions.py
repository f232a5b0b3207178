"""The ONNX versions a build declares: the lowest standard opset its ops need and the IR version
that opset needs, whatever `onnx` is installed.

onnx writes its newest IR version by default (14 with onnx 1.23), which every onnxruntime but the
newest refuses ("Unsupported model IR version"); so does a TensorRT parser older than the opset.
docs/compatibility.md lists who loads what.
"""

from __future__ import annotations


import onnx
from onnx import helper

# Every graph has LayerNormalization (opset 17); the `window` layout's TensorScatter (TensorRT's
# in-place KV-cache update) first exists in opset 24; TensorRT's int8/int4 weights are
# DequantizeLinear with float16/bfloat16 scales (DequantizeLinear-19), int4 ones blocked (block_size
# and int4: 21, and IR 10).
# Between 17 and 24 the other ops we emit only gained types we do not use (tests/test_compat.py
# checks each graph, and the TensorRT < 10.15 fallback of each, fails onnx.checker one lower).
BASE_OPSET = 17
NEWER_OPS = {"TensorScatter": lambda node: 24,
             "DequantizeLinear": lambda node: 21 if any(a.name == "block_size" for a in node.attribute) else 19}
STANDARD_DOMAINS = ("", "ai.onnx")


def standard_opset(model: onnx.ModelProto) -> int:
    """The lowest standard (ai.onnx) opset that defines every op of the graph and its functions."""
    nodes = [*model.graph.node, *(node for function in model.functions for node in function.node)]
    return max([BASE_OPSET, *(NEWER_OPS[node.op_type](node) for node in nodes
                              if node.domain in STANDARD_DOMAINS and node.op_type in NEWER_OPS)])


def declare_versions(model: onnx.ModelProto) -> dict:
    """Set the standard opset imports of `model` and its functions (onnx.checker wants them equal)
    to `standard_opset`, and its IR version to the lowest those imports need; return both as the
    manifest records them: {"ir_version": 8, "opset_imports": {"ai.onnx": 17, "persimmon": 1, ...}}."""
    opset = standard_opset(model)
    for imports in [model.opset_import, *(function.opset_import for function in model.functions)]:
        for entry in imports:
            if entry.domain in STANDARD_DOMAINS:
                entry.version = opset
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return {"ir_version": model.ir_version,
            "opset_imports": {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}}

