"""Which attention onnxruntime's CPU provider runs best over our KV cache: one layer's attention, alone.

    .venv/bin/python benchmarks/attention.py                 # 100M shapes: 12 heads x 64
    .venv/bin/python benchmarks/attention.py --heads 16      # 300M shapes

Each candidate writes the step's new keys/values into the cache (in place: the cache OrtValue is
bound as both input and output) and attends, for a prefill of `--prompt` tokens from slot 0 and
for one decode step at `--prompt` tokens of context, with caches of two capacities, to see whether
the cost follows the context or the capacity:
  - matmul:    TensorScatter + MatMul / Where / Softmax / MatMul over a cache as long as the context
               rounded up to 256 slots (the `whole` layout; its growth copies are not timed here);
  - int8:      the same as matmul with both products on the integer units (MatMulInteger; q, k, v and
               the probabilities as 8-bit codes with dynamic scales; int8_attention);
  - attention: TensorScatter + ONNX Attention (opset 24) with a boolean mask, over the whole capacity;
  - gqa:       com.microsoft.GroupQueryAttention over the capacity buffer, per-row `seqlens_k`;
  - gqa-int8:  the same over an int8 cache, per-channel scales (`build --kv-cache int8`).
Each is first checked against numpy. Prints median and p90 ms of `--repeats` runs and writes
benchmarks/results/attention.json.
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from cli import BenchmarkParser, write_json
from machine import cpu_features, machine

F32 = TensorProto.FLOAT


def _session(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "attention", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _info(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _cache_io(heads, head_dim, cache_type=F32):
    cache = ["B", heads, "S", head_dim]
    return ([_info("past_key", cache_type, cache), _info("past_value", cache_type, cache)],
            [_info("present_key", cache_type, cache), _info("present_value", cache_type, cache)])


def scatter_then(attend, heads, head_dim):
    """q/k/v [B, heads, T, head_dim]; TensorScatter at first_slot, then `attend` (matmul or attention)."""
    past, present = _cache_io(heads, head_dim)
    nodes = [helper.make_node("TensorScatter", [f"past_{n}", f"new_{n}", "first_slot"], [f"present_{n}"], axis=-2)
             for n in ("key", "value")]
    inputs = [_info("q", F32, ["B", heads, "T", head_dim]), _info("new_key", F32, ["B", heads, "T", head_dim]),
              _info("new_value", F32, ["B", heads, "T", head_dim]), _info("first_slot", TensorProto.INT64, ["B"]),
              _info("allowed", TensorProto.BOOL, ["B", 1, "T", "S"]), *past]
    scale = helper.make_tensor("scale", F32, [], [head_dim ** -0.5])
    masked = helper.make_tensor("masked", F32, [], [float(np.finfo(np.float32).min)])
    if attend == "matmul":
        nodes += [helper.make_node("Mul", ["q", "scale"], ["q_scaled"]),
                  helper.make_node("Transpose", ["present_key"], ["key_t"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", ["q_scaled", "key_t"], ["scores"]),
                  helper.make_node("Where", ["allowed", "scores", "masked"], ["masked_scores"]),
                  helper.make_node("Softmax", ["masked_scores"], ["probs"], axis=-1),
                  helper.make_node("MatMul", ["probs", "present_value"], ["out"])]
    elif attend == "int8":
        nodes += int8_attention()
    else:
        nodes.append(helper.make_node("Attention", ["q", "present_key", "present_value", "allowed"], ["out"],
                                      scale=head_dim ** -0.5))
    constants = [helper.make_tensor(name, F32, [], [value]) for name, value in (("c127", 127.0), ("c255", 255.0))] + [
        helper.make_tensor(name, TensorProto.INT64, [len(axes)], axes)
        for name, axes in (("per_head", [2, 3]), ("per_channel", [2]), ("per_row", [3]))]
    return _session(nodes, inputs, [_info("out", F32, ["B", heads, "T", head_dim]), *present],
                    [scale, masked, *constants])


def _int8_codes(name, axes, code_type=TensorProto.INT8, levels="c127"):
    """Nodes giving `name`_codes (round(x / scale)) and `name`_scale (max |x| over `axes` / levels)."""
    return [helper.make_node("Abs", [name], [f"{name}_abs"]),
            helper.make_node("ReduceMax", [f"{name}_abs", axes], [f"{name}_max"], keepdims=1),
            helper.make_node("Div", [f"{name}_max", levels], [f"{name}_scale"]),
            helper.make_node("Div", [name, f"{name}_scale"], [f"{name}_scaled"]),
            helper.make_node("Round", [f"{name}_scaled"], [f"{name}_rounded"]),
            helper.make_node("Cast", [f"{name}_rounded"], [f"{name}_codes"], to=code_type)]


def int8_attention():
    """Attention with both products on the CPU's integer units (MatMulInteger): q and k as int8 per
    head (QK-layernorm keeps every token at a like scale), v per head and channel, the softmax's
    probabilities as uint8 per row; scores and softmax in fp32. Issue 24's question: do int8
    products make prompt-step attention cheaper than GroupQueryAttention's fp32 kernel?"""
    return [*_int8_codes("q", "per_head"), *_int8_codes("present_key", "per_head"),
            *_int8_codes("present_value", "per_channel"),
            helper.make_node("Transpose", ["present_key_codes"], ["key_codes_t"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMulInteger", ["q_codes", "key_codes_t"], ["scores_int"]),
            helper.make_node("Cast", ["scores_int"], ["scores_codes"], to=F32),
            helper.make_node("Mul", ["q_scale", "present_key_scale"], ["qk_scale"]),
            helper.make_node("Mul", ["qk_scale", "scale"], ["score_scale"]),
            helper.make_node("Mul", ["scores_codes", "score_scale"], ["scores"]),
            helper.make_node("Where", ["allowed", "scores", "masked"], ["masked_scores"]),
            helper.make_node("Softmax", ["masked_scores"], ["probs"], axis=-1),
            *_int8_codes("probs", "per_row", TensorProto.UINT8, "c255"),
            helper.make_node("MatMulInteger", ["probs_codes", "present_value_codes"], ["out_int"]),
            helper.make_node("Cast", ["out_int"], ["out_codes"], to=F32),
            helper.make_node("Mul", ["out_codes", "probs_scale"], ["out_rows"]),
            helper.make_node("Mul", ["out_rows", "present_value_scale"], ["out"])]


INT8_CACHE_SCALE = 5.0 / 127  # the gqa-int8 cache's scale for every channel: standard normal keys/values


def gqa(heads, head_dim, int8_cache=False):
    """q/k/v [B, T, heads * head_dim]; the op writes k/v at seqlens_k + 1 - T and attends to 0..seqlens_k.
    `int8_cache`: the caches hold round(x / INT8_CACHE_SCALE) per channel (`build --kv-cache int8`'s form)."""
    past, present = _cache_io(heads, head_dim, TensorProto.INT8 if int8_cache else F32)
    hidden = heads * head_dim
    names = ["q", "new_key", "new_value", "past_key", "past_value", "seqlens_k", "total"]
    quantized, scales = {}, []
    if int8_cache:
        quantized = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
        names += ["", "", "", "", "", "key_scale", "value_scale"]
        scales = [helper.make_tensor(f"{n}_scale", F32, [heads, 1, head_dim], [INT8_CACHE_SCALE] * hidden)
                  for n in ("key", "value")]
    node = helper.make_node("GroupQueryAttention", names, ["out", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=heads, scale=head_dim ** -0.5,
                            **quantized)
    inputs = [_info(n, F32, ["B", "T", hidden]) for n in ("q", "new_key", "new_value")] + past + [
        _info("seqlens_k", TensorProto.INT32, ["B"]), _info("total", TensorProto.INT32, [])]
    return _session([node], inputs, [_info("out", F32, ["B", "T", hidden]), *present], scales)


def reference(q, keys, values, first, scale):
    """numpy attention of q [B, H, T, D] over caches holding the new keys, causal from slot `first`."""
    tokens = q.shape[2]
    context = first + tokens
    scores = np.einsum("bhtd,bhsd->bhts", q, keys[:, :, :context]) * scale
    allowed = np.arange(context)[None, :] <= first + np.arange(tokens)[:, None]
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhts,bhsd->bhtd", probs / probs.sum(-1, keepdims=True), values[:, :, :context])


def run_case(kind, session, heads, head_dim, first, tokens, slots, repeats):
    """(median ms, p90 ms, max |diff| against numpy) of one candidate at one shape, batch 1."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, heads, tokens, head_dim), np.float32) for _ in range(3))
    caches = [np.zeros((1, heads, slots, head_dim), np.int8 if kind == "gqa-int8" else np.float32) for _ in range(2)]
    values = [ort.OrtValue.ortvalue_from_numpy(c) for c in caches]
    bind = session.io_binding()
    for name, value in zip(("key", "value"), values):
        bind.bind_ortvalue_input(f"past_{name}", value)
        bind.bind_ortvalue_output(f"present_{name}", value)
    if kind.startswith("gqa"):
        feeds = {"q": q, "new_key": k, "new_value": v}
        feeds = {n: np.ascontiguousarray(a.transpose(0, 2, 1, 3).reshape(1, tokens, -1)) for n, a in feeds.items()}
        feeds.update(seqlens_k=np.array([first + tokens - 1], np.int32), total=np.array(first + tokens, np.int32))
    else:
        allowed = np.arange(slots)[None, :] <= first + np.arange(tokens)[:, None]
        feeds = {"q": q, "new_key": k, "new_value": v, "first_slot": np.array([first], np.int64),
                 "allowed": np.ascontiguousarray(allowed[None, None])}
    for name, array in feeds.items():
        bind.bind_cpu_input(name, array)
    bind.bind_output("out")
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        session.run_with_iobinding(bind)
        times.append(time.perf_counter() - start)
    out = bind.get_outputs()[-1].numpy()
    if kind.startswith("gqa"):
        out = out.reshape(1, tokens, heads, head_dim).transpose(0, 2, 1, 3)
    if kind == "gqa-int8":  # numpy attends over the values the int8 cache can hold
        k, v = (np.clip(np.round(x / INT8_CACHE_SCALE), -127, 127) * INT8_CACHE_SCALE for x in (k, v))
    expected_keys = caches[0].astype(np.float32)
    expected_keys[:, :, first:first + tokens] = k
    expected_values = caches[1].astype(np.float32)
    expected_values[:, :, first:first + tokens] = v
    expected = reference(q, expected_keys, expected_values, first, head_dim ** -0.5)
    times_ms = np.array(times[1:]) * 1e3
    return float(np.median(times_ms)), float(np.percentile(times_ms, 90)), float(np.abs(out - expected).max())


def main() -> None:
    parser = BenchmarkParser(__doc__, "attention.json", dict(heads=2, head_dim=16, prompt=32, capacities=[64],
                                                             repeats=1))
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--capacities", type=int, nargs="+", default=[1280, 4096])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    heads, head_dim, prompt = args.heads, args.head_dim, args.prompt
    print(f"onnxruntime {ort.__version__}, {machine()}, "
          f"load {os.getloadavg()[0]:.2f}; {heads} heads x {head_dim}, batch 1, fp32")
    sessions = {kind: scatter_then(kind, heads, head_dim) for kind in ("matmul", "int8", "attention")}
    sessions["gqa"] = gqa(heads, head_dim)
    sessions["gqa-int8"] = gqa(heads, head_dim, int8_cache=True)
    rows = []
    whole = -(-(prompt + 1) // 256) * 256  # the whole layout's cache length after the first decode step
    for role, first, tokens in (("prefill", 0, prompt), ("decode", prompt, 1)):
        for kind, session in sessions.items():
            grown = -(-(first + tokens) // 256) * 256 if role == "prefill" else whole
            capacities = [grown] if kind in ("matmul", "int8") else args.capacities
            for slots in capacities:
                median, p90, diff = run_case(kind, session, heads, head_dim, first, tokens, slots, args.repeats)
                rows.append({"role": role, "op": kind, "cache_slots": slots, "median_ms": median, "p90_ms": p90,
                             "max_abs_diff": diff})
                print(f"{role:8s} {kind:10s} cache {slots:5d} slots: median {median:8.3f} ms  p90 {p90:8.3f} ms  "
                      f"max|diff| {diff:.1e}")
    write_json(args.json, {"machine": machine(), "cpu": cpu_features(), "onnxruntime": ort.__version__,
                           "heads": heads, "head_dim": head_dim, "prompt": prompt, "rows": rows})


if __name__ == "__main__":
    main()
