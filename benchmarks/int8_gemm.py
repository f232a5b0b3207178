"""Which onnxruntime op multiplies fastest on this CPU, by rows per step (issue 24's choice of the
prefill graph's op, per CPU family):

    .venv/bin/python benchmarks/int8_gemm.py                 # [M x 1024] x [1024 x 4096], M = 1 .. 1024
    .venv/bin/python benchmarks/int8_gemm.py --rows 1 256 --inner 768 --outer 3072

Ops, each one graph of a single node, 2 threads (os.cpu_count()), best of --repeats:
  MatMul fp32; com.microsoft.DynamicQuantizeMatMul with int8 weights per output channel (the
  prefill graph's op; u8 x s8 in MLAS) and with uint8 weights (u8 x u8, what onnxruntime's
  session.x64quantprecision turns the former into); com.microsoft.MatMulNBits 8- and 4-bit, block
  32, accuracy_level 4 (the decode graph's op in --weights builds).
Prints GFLOP/s and the error against fp32 (max |dy| / max |y|); records the CPU's units.
Writes benchmarks/results/int8_gemm.json.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cli import BenchmarkParser, write_json  # noqa: E402
from machine import cpu_features  # noqa: E402

CONTRIB = "com.microsoft"


def graph(node, initializers: dict, rows: int, inner: int) -> bytes:
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, inner])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CONTRIB, 1)],
                              ir_version=8)
    return model.SerializeToString()


def cases(weight: np.ndarray, rows: int) -> dict:
    """name -> (node, initializers) for each op, all computing A @ weight."""
    inner, outer = weight.shape
    scale = (np.abs(weight).max(0) / 127).astype(np.float32)
    codes = np.round(weight / scale).astype(np.int8)
    found = {"MatMul fp32": (helper.make_node("MatMul", ["A", "W"], ["Y"]), {"W": weight}),
             "DynamicQuantizeMatMul u8 x s8": (
                 helper.make_node("DynamicQuantizeMatMul", ["A", "B", "s"], ["Y"], domain=CONTRIB),
                 {"B": codes, "s": scale}),
             "DynamicQuantizeMatMul u8 x u8": (
                 helper.make_node("DynamicQuantizeMatMul", ["A", "B", "s", "z"], ["Y"], domain=CONTRIB),
                 {"B": (codes.astype(np.int16) + 128).astype(np.uint8), "s": scale,
                  "z": np.full(outer, 128, np.uint8)})}
    for bits in (8, 4):
        block, qmax = 32, 2 ** (bits - 1) - 1
        blocks = weight.T.reshape(outer, inner // block, block)
        block_scale = np.abs(blocks).max(-1) / qmax
        stored = (np.clip(np.round(blocks / block_scale[..., None]), -qmax, qmax) + qmax + 1).astype(np.uint8)
        stored = stored.reshape(-1)
        if bits == 4:
            stored = stored[0::2] | (stored[1::2] << 4)
        node = helper.make_node("MatMulNBits", ["A", "B", "s"], ["Y"], domain=CONTRIB, K=inner, N=outer, bits=bits,
                                block_size=block, accuracy_level=4)
        found[f"MatMulNBits {bits}-bit, accuracy_level 4"] = (
            node, {"B": stored.reshape(outer, inner // block, -1), "s": block_scale.astype(np.float32)})
    return found


def measure(blob: bytes, a: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"A": a})[0]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {"A": a})
        times.append(time.perf_counter() - started)
    return min(times), y


def main() -> None:
    parser = BenchmarkParser(__doc__, "int8_gemm.json", dict(rows=[1, 16], inner=64, outer=128, repeats=1))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    parser.add_argument("--inner", type=int, default=1024)
    parser.add_argument("--outer", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((args.inner, args.outer)) * 0.02).astype(np.float32)
    features = cpu_features()
    print(f"{features['model']}, {features['cores']} cores, {' '.join(features['flags'])}; onnxruntime "
          f"{ort.__version__}")
    results = []
    for rows in args.rows:
        a = rng.standard_normal((rows, args.inner)).astype(np.float32)
        exact = a @ weight
        for name, (node, initializers) in cases(weight, rows).items():
            seconds, y = measure(graph(node, initializers, rows, args.inner), a, args.repeats)
            flops = 2 * rows * args.inner * args.outer / seconds
            error = float(np.abs(y - exact).max() / np.abs(exact).max())
            results.append({"rows": rows, "op": name, "ms": seconds * 1e3, "gflop_s": flops / 1e9, "error": error})
            print(f"M {rows:5d}  {name:38s} {seconds * 1e3:8.3f} ms {flops / 1e9:7.0f} GFLOP/s  error {error:.1e}",
                  flush=True)
    write_json(args.json, {"machine": features, "onnxruntime": ort.__version__, "inner": args.inner,
                           "outer": args.outer, "results": results})


if __name__ == "__main__":
    main()
