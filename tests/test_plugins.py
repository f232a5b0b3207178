"""CUDA kernels of the custom ops: they compile for sm_80/sm_90 here; on a GPU they match numpy."""

import os
import re
import tempfile

import numpy as np
import onnx
import pytest

from persimmon_export.config import PersimmonConfig
from persimmon_export.export import build_graph
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
