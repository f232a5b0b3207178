"""CUDA kernels of the custom ops: they compile for sm_80/sm_90 here; on a GPU they match numpy.
The plugin definitions have the signatures tensorrt.plugin accepts, checked here without TensorRT."""

import importlib
import inspect
import os
import re
import sys
import tempfile
import types
import typing

import numpy as np
import onnx
import pytest

from persimmon_export.config import PersimmonConfig
from persimmon_export.export import build_graph, custom_op_functions
import persimmon_plugins
from persimmon_plugins import KERNELS, NAMESPACE, QK_LAYERNORM_OP, ROTARY_OP
from persimmon_plugins.compile import ARCHITECTURES, PTX_TARGET, compile_kernel, nvcc

needs_nvcc = pytest.mark.skipif(nvcc() is None, reason="nvcc not found: the CUDA toolkit is needed to compile kernels")


@needs_nvcc
@pytest.mark.parametrize("op", sorted(KERNELS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kernels_compile_for_each_architecture(op, arch):
    cubin = compile_kernel(op, arch, kind="cubin")
    assert cubin[:4] == b"\x7fELF"


@needs_nvcc
@pytest.mark.parametrize("op", sorted(KERNELS))
def test_ptx_exports_the_kernel_names_the_plugins_launch(op):
    ptx = compile_kernel(op, PTX_TARGET).decode()
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert entries == set(KERNELS[op][1].values())


def test_onnx_custom_nodes_are_exactly_the_plugin_ops():
    graph = build_graph(PersimmonConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2), "float16", 16)
    custom = {(n.domain, n.op_type) for n in graph.node if n.domain}
    assert custom == {(NAMESPACE, QK_LAYERNORM_OP), (NAMESPACE, ROTARY_OP)} == {(NAMESPACE, op) for op in KERNELS}
    for node in graph.node:
        if node.domain:
            assert onnx.helper.get_node_attr_value(node, "plugin_namespace").decode() == NAMESPACE


# ---- the plugin definitions, as tensorrt.plugin reads them, without TensorRT ----
#
# tensorrt.plugin (NVIDIA's open-source plugin layer, plain Python) validates every definition
# from its signature: each annotation is tested with issubclass() against TensorDesc and friends,
# attributes must be serializable builtins, aot_impl's parameters and return annotation must
# follow a fixed schema. The stand-in below offers only the names the plugin layer exports and
# records the decorated functions; the checks are those rules, restated.

SERIALIZABLE_ATTRIBUTE_TYPES = (int, float, bytes, bool, str)
RESERVED_PARAMETERS = {"outputs", "stream", "tactic"}
ONNX_PLUGIN_ATTRIBUTES = {"plugin_version", "plugin_namespace"}  # read by the ONNX parser, not the plugin


def _tensorrt_stand_in():
    """Modules `tensorrt` and `tensorrt.plugin` with the classes and decorators the definitions use."""
    trt = types.ModuleType("tensorrt")
    trt.float16, trt.float32 = "DataType.HALF", "DataType.FLOAT"
    trtp = types.ModuleType("tensorrt.plugin")

    class SymExprs:
        pass

    for name, cls in {"TensorDesc": type("TensorDesc", (), {}), "KernelLaunchParams": type("KernelLaunchParams", (), {}),
                      "SymExprs": SymExprs, "SymIntExprs": type("SymIntExprs", (SymExprs,), {}),
                      "SymInt32": type("SymInt32", (), {})}.items():
        setattr(trtp, name, cls)
    trtp.cdiv = lambda first, second: None
    trtp.registered, trtp.aot = {}, {}

    def recorder(table):
        def decorator_for(plugin_id):
            def record(function):
                table[plugin_id] = function
                return function
            return record
        return decorator_for

    trtp.register, trtp.aot_impl = recorder(trtp.registered), recorder(trtp.aot)
    trt.plugin = trtp
    return trt, trtp


@pytest.fixture
def plugin_definitions():
    """Import tensorrt_plugins against the stand-in; leave sys.modules and the package as they were."""
    name = "persimmon_plugins.tensorrt_plugins"
    trt, trtp = _tensorrt_stand_in()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tensorrt", trt)
        patch.setitem(sys.modules, "tensorrt.plugin", trtp)
        patch.setitem(sys.modules, name, None)  # undone: the real module, or none, comes back
        del sys.modules[name]
        patch.setattr(persimmon_plugins, "tensorrt_plugins", None, raising=False)
        importlib.import_module(name)
        yield trtp


def _is_class_below(annotation, base) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, base)


def _registered_schema(trtp, plugin_id):
    """(tensor names, {attribute: type}, output count) of a register function, or AssertionError."""
    function = trtp.registered[plugin_id]
    tensors, attributes = [], {}
    for name, parameter in inspect.signature(function).parameters.items():
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and parameter.default is parameter.empty
        annotation = parameter.annotation
        if _is_class_below(annotation, trtp.TensorDesc):
            assert not attributes, f"{plugin_id}: tensor {name} after an attribute"
            tensors.append(name)
        else:
            assert tensors, f"{plugin_id}: the first parameter must be a TensorDesc"
            assert annotation in SERIALIZABLE_ATTRIBUTE_TYPES, f"{plugin_id}: {name}: {annotation!r}"
            assert name not in RESERVED_PARAMETERS
            attributes[name] = annotation
    returned = inspect.signature(function).return_annotation
    outputs = typing.get_args(returned) if typing.get_origin(returned) is tuple else (returned,)
    assert outputs and all(_is_class_below(out, trtp.TensorDesc) for out in outputs), f"{plugin_id}: {returned!r}"
    return tensors, attributes, len(outputs)


def _check_aot_impl(trtp, plugin_id, tensors, attributes):
    signature = inspect.signature(trtp.aot[plugin_id])
    parameters = signature.parameters
    used_attributes = [name for name in attributes if name in parameters]
    assert list(parameters) == [*tensors, *used_attributes, "outputs", "tactic"]
    for name in tensors:
        assert _is_class_below(parameters[name].annotation, trtp.TensorDesc), f"{plugin_id}: {name}"
    for name in used_attributes:
        assert parameters[name].annotation is attributes[name], f"{plugin_id}: {name}"
    outputs = parameters["outputs"].annotation
    assert typing.get_origin(outputs) is tuple
    assert all(_is_class_below(arg, trtp.TensorDesc) for arg in typing.get_args(outputs))
    assert _is_class_below(parameters["tactic"].annotation, int)
    returned = signature.return_annotation
    assert typing.get_origin(returned) is tuple and len(typing.get_args(returned)) == 4, f"{plugin_id}: {returned!r}"
    name, code, launch, scalars = typing.get_args(returned)
    for text in (name, code):  # kernel name and PTX: str or bytes, or a union of them
        assert set(typing.get_args(text) or (text,)) <= {str, bytes}, f"{plugin_id}: {text!r}"
    assert _is_class_below(launch, trtp.KernelLaunchParams) and _is_class_below(scalars, trtp.SymExprs)


def test_every_custom_op_has_a_plugin_and_an_aot_implementation(plugin_definitions):
    expected = {f"{NAMESPACE}::{op}" for op in KERNELS}
    assert set(plugin_definitions.registered) == set(plugin_definitions.aot) == expected


@pytest.mark.parametrize("function", custom_op_functions(), ids=lambda f: f.name)
def test_plugin_signatures_are_what_tensorrt_accepts_and_match_the_onnx_op(plugin_definitions, function):
    plugin_id = f"{function.domain}::{function.name}"
    tensors, attributes, outputs = _registered_schema(plugin_definitions, plugin_id)
    _check_aot_impl(plugin_definitions, plugin_id, tensors, attributes)
    # the ONNX parser hands the node's inputs and attributes to the plugin by position and name
    assert tensors == list(function.input) and outputs == len(function.output)
    assert set(attributes) == set(function.attribute) - ONNX_PLUGIN_ATTRIBUTES


def test_postponed_annotations_are_caught(plugin_definitions):
    """The bug this guards against: `from __future__ import annotations` turns every annotation
    into a string, on which tensorrt.plugin's issubclass() raises and nothing registers."""
    namespace = {}
    exec("from __future__ import annotations\nimport tensorrt.plugin as trtp\n"
         "def desc(x: trtp.TensorDesc) -> trtp.TensorDesc: ...", {"trtp": plugin_definitions}, namespace)
    plugin_definitions.registered["persimmon::Postponed"] = namespace["desc"]
    with pytest.raises(AssertionError, match="first parameter must be a TensorDesc"):
        _registered_schema(plugin_definitions, "persimmon::Postponed")


@pytest.mark.gpu
def test_plugins_register_in_tensorrt():
    """With NVIDIA TensorRT (GPU machines): importing the module registers both creators."""
    trt = pytest.importorskip("tensorrt", reason="NVIDIA TensorRT is not installed")
    pytest.importorskip("tensorrt.plugin", reason=f"tensorrt {trt.__version__} has no tensorrt.plugin (needs >= 10.7)")
    importlib.import_module("persimmon_plugins.tensorrt_plugins")
    registry = trt.get_plugin_registry()
    for op in KERNELS:
        assert registry.get_creator(op, "1", NAMESPACE) is not None, op


# ---- on a GPU: kernels against a numpy reference ----

def _cupy():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        return cupy
    except Exception as e:  # no cupy, no driver, or no device
        pytest.skip(f"no CUDA device through CuPy ({e.__class__.__name__}): kernel tests run on a GPU machine")


def _kernel(cupy, op, dtype):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "wb") as f:
            f.write(compile_kernel(op, PTX_TARGET))
        return cupy.RawModule(path=path).get_function(KERNELS[op][1][dtype])


@pytest.mark.gpu
@needs_nvcc
@pytest.mark.parametrize("dtype,bound", [("float32", 1e-4), ("float16", 1e-2)])
def test_qk_layernorm_kernel_matches_numpy(dtype, bound):
    cupy = _cupy()
    rng = np.random.default_rng(0)
    rows, head_dim, eps = 3 * 5 * 4, 64, 1e-5
    q, k = (rng.normal(size=(rows, head_dim)).astype(dtype) * 30 for _ in range(2))
    qw, qb, kw, kb = (rng.normal(size=head_dim).astype(np.float32) for _ in range(4))

    def reference(x, w, b):
        x = x.astype(np.float64)
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b

    args = [cupy.asarray(a) for a in (q, k, qw, qb, kw, kb)]
    outs = [cupy.empty_like(args[0]), cupy.empty_like(args[1])]
    warps_per_block = 4
    grid = (2 * rows + warps_per_block - 1) // warps_per_block
    eps_bits = np.array(eps, np.float32).view(np.int32)
    _kernel(cupy, QK_LAYERNORM_OP, dtype)((grid,), (32 * warps_per_block,),
                                          (*args, np.int32(rows), np.int32(head_dim), eps_bits, *outs))
    for got, x, w, b in ((outs[0], q, qw, qb), (outs[1], k, kw, kb)):
        assert np.abs(cupy.asnumpy(got).astype(np.float64) - reference(x, w, b)).max() <= bound


@pytest.mark.gpu
@needs_nvcc
@pytest.mark.parametrize("dtype,rotary_dims", [("float32", 32), ("float16", 32), ("float32", 24), ("float32", 64)])
def test_partial_rotary_kernel_matches_numpy(dtype, rotary_dims):
    cupy = _cupy()
    rng = np.random.default_rng(1)
    tokens, heads, head_dim = 7, 4, 64
    x = rng.normal(size=(tokens, heads, head_dim)).astype(dtype)
    angles = rng.uniform(0, 100, size=(tokens, rotary_dims // 2))
    cos = np.cos(np.concatenate([angles, angles], -1)).astype(np.float32)
    sin = np.sin(np.concatenate([angles, angles], -1)).astype(np.float32)
    rot = x[..., :rotary_dims].astype(np.float64)
    x1, x2 = rot[..., :rotary_dims // 2], rot[..., rotary_dims // 2:]
    rotated = rot * cos[:, None] + np.concatenate([-x2, x1], -1) * sin[:, None]
    expected = np.concatenate([rotated, x[..., rotary_dims:].astype(np.float64)], -1)
    out = cupy.empty((tokens, heads, head_dim), dtype)
    total = tokens * heads * head_dim
    _kernel(cupy, ROTARY_OP, dtype)(((total + 255) // 256,), (256,),
                                    (cupy.asarray(x), cupy.asarray(cos), cupy.asarray(sin), np.int32(tokens),
                                     np.int32(heads), np.int32(head_dim), np.int32(rotary_dims), out))
    bound = 1e-5 if dtype == "float32" else 4e-3
    assert np.abs(cupy.asnumpy(out).astype(np.float64) - expected).max() <= bound
