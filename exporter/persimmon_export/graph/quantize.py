"""Weight-only int8 / int4 builds (`build --weights int8|int4`) and the int8 prefill graph.

Each quantized linear weight is stored as symmetric integer codes and one scale per `block_size`
inputs of an output (docs/quantization.md), in the form each runtime's fast kernel takes:
onnxruntime's `com.microsoft.MatMulNBits` (int8 activations inside the kernel), TensorRT's
`DequantizeLinear` into the MatMul. The prefill graph (`build --prefill int8`) multiplies int8
weights per output channel by activations quantized per token, with `com.microsoft.
DynamicQuantizeMatMul` (MLAS's u8 x s8 GEMM: AMX-INT8 / AVX512-VNNI / AVX-VNNI kernels). Codes are
computed in chunks as the weights stream through the export, never a copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.manifest import PREFILL_OPS, WEIGHT_OPS, PrefillSection, WeightsSection

from .attention import CONTRIB_DOMAIN

WEIGHT_BITS = {"int8": 8, "int4": 4}
MATMUL_NBITS, DEQUANTIZE = WEIGHT_OPS  # onnxruntime's fused op, TensorRT's weight-only pattern
(DYNAMIC_INT8,) = PREFILL_OPS          # onnxruntime's int8 x int8 GEMM (prefill graphs)
# accuracy_level 4: MatMulNBits may quantize A to int8 (per block) and use integer dot products
INT8_COMPUTE = 4
DEFAULT_BLOCK_SIZE = 32
MIN_BLOCK_SIZE = 16  # MatMulNBits' smallest block; blocks are powers of two
LINEARS = ("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")
# TensorRT builds keep query_key_value in --dtype: TensorRT-RTX 1.7's builder segfaults in its
# compiler backend ("Compiler backend is used during engine build", then SIGSEGV) on the demo
# model once that weight is dequantized, int8 or int4, float16 or bfloat16; the other three
# linears and lm_head build. A DequantizeLinear + MatMul + Add + Reshape + Gather alone builds,
# so it is the whole attention block it fuses with; retry when TensorRT changes.
ENGINE_LINEARS = LINEARS[1:]
LM_HEAD = "lm_head.weight"
PREFILL_FILE, PREFILL_DATA_FILE = "prefill.onnx", "prefill.onnx.data"
LM_HEAD_QUANTIZED = {"int8": True, "int4": True}
CHUNK_ELEMENTS = 1 << 24  # a chunk's fp32 copy is 64 MiB; its codes and quotient as much again


class QuantizeError(PersimmonError):
    pass


@dataclass(frozen=True)
class WeightFormat:
    """How a build stores its linear weights; `section()` is what the manifest records."""
    type: str                 # a WEIGHT_BITS key
    block_size: int | None    # inputs per scale; None: one scale per output channel
    op: str                   # MATMUL_NBITS or DEQUANTIZE
    tensors: tuple            # name suffixes of the quantized weights

    @property
    def bits(self) -> int:
        return WEIGHT_BITS[self.type]

    def quantizes(self, name: str) -> bool:
        return name.endswith(self.tensors)

    def section(self) -> WeightsSection:
        return WeightsSection(type=self.type, block_size=self.block_size, op=self.op, tensors=list(self.tensors))


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(K inputs, N outputs) of each linear weight, by name suffix."""
    hidden, inner = config.hidden_size, config.intermediate_size
    return {"query_key_value.weight": (hidden, 3 * hidden), "dense.weight": (hidden, hidden),
            "dense_h_to_4h.weight": (hidden, inner), "dense_4h_to_h.weight": (inner, hidden),
            LM_HEAD: (hidden, config.vocab_size)}


def weight_format(weights: str | None, block_size: int | None, config, engine: bool,
                  lm_head: bool | None = None) -> WeightFormat | None:
    """The checked --weights / --block-size choice for this model and backend (None: not quantized).
    `engine`: a TensorRT build (DequantizeLinear), else onnxruntime (MatMulNBits)."""
    if weights is None:
        if block_size is not None:
            raise QuantizeError(f"--block-size {block_size} is for quantized weights: add --weights int8 or int4")
        return None
    if weights not in WEIGHT_BITS:
        raise QuantizeError(f"--weights {weights!r} is not supported: choose one of {sorted(WEIGHT_BITS)} "
                            f"(or leave it out to store weights in --dtype)")
    lm_head = LM_HEAD_QUANTIZED[weights] if lm_head is None else lm_head
    op = DEQUANTIZE if engine else MATMUL_NBITS
    tensors = (ENGINE_LINEARS if engine else LINEARS) + ((LM_HEAD,) if lm_head else ())
    if engine and weights == "int8":
        if block_size is not None:
            raise QuantizeError(f"--block-size {block_size}: TensorRT int8 weights have one scale per output "
                                f"channel (its INT8 weight-only GEMM takes no blocks); leave --block-size out or "
                                f"build --weights int4")
        return WeightFormat(weights, None, op, tensors)
    block = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if type(block) is not int or block < MIN_BLOCK_SIZE or block & (block - 1):
        raise QuantizeError(f"--block-size must be a power of two >= {MIN_BLOCK_SIZE} (e.g. 32, 64, 128), "
                            f"got {block!r}")
    for name, (inputs, _) in linear_shapes(config).items():
        if name in tensors and inputs % block:
            fits = max((b for b in (16, 32, 64, 128, 256) if inputs % b == 0), default=None)
            hint = f"use --block-size {fits}" if fits else "this model cannot be built with blocks"
            raise QuantizeError(f"--block-size {block} does not divide the {inputs} inputs of {name} "
                                f"(blocks run along the inputs): {hint}")
    return WeightFormat(weights, block, op, tensors)


# the prefill graph's linears and lm_head: int8 per output channel for DynamicQuantizeMatMul. An
# lm_head in the build's format would be a second prepacked copy of it (onnxruntime packs each
# session's MatMul weights; in fp32 for a float16 build on CPU): in int8 it costs 1 byte a weight
_PREFILL_INT8 = WeightFormat("int8", None, DYNAMIC_INT8, LINEARS + (LM_HEAD,))


# Steps with fewer new tokens per row run the build's own graph (chosen by measurement,
# docs/benchmarks.md "Prefill on the CPU's integer units")
PREFILL_MIN_TOKENS = 16
PREFILL_GRAPHS = ("int8", "none")  # build --prefill: which prefill graph to write


def prefill_format(prefill: str | None, weights: str | None, step_graph: str | None) -> WeightFormat | None:
    """The checked --prefill choice (None: the default, int8 for --weights int8/int4 builds); the
    format of the prefill graph's linears or None for no prefill graph. `step_graph`: None where
    the build's graph can have one (an onnxruntime causal LM, cache layout 'capacity'), else why not."""
    if prefill is None:
        prefill = "int8" if weights is not None and step_graph is None else "none"
    if prefill not in PREFILL_GRAPHS:
        raise QuantizeError(f"--prefill {prefill!r} is not one of {PREFILL_GRAPHS}")
    if prefill == "none":
        return None
    if step_graph is not None:
        raise QuantizeError(f"--prefill int8 adds a graph for onnxruntime's causal-LM step with cache layout "
                            f"'capacity'; this build {step_graph}: leave --prefill out")
    return _PREFILL_INT8


def prefill_section(fmt: WeightFormat) -> PrefillSection:
    return PrefillSection(file=PREFILL_FILE, data_file=PREFILL_DATA_FILE, weights=fmt.type, op=fmt.op,
                          tensors=list(fmt.tensors), min_tokens=PREFILL_MIN_TOKENS)


def emit_matmul(g, x: str, weight: str, fmt: WeightFormat, inputs: int, outputs: int, half: bool = False) -> str:
    """x @ W for a quantized W stored as `weight` (codes) and `weight`_scale; returns the output.
    `half`: x is float16 (DynamicQuantizeMatMul takes float32 only)."""
    scale = scale_name(weight)
    if fmt.op == DYNAMIC_INT8:
        return _dynamic_int8_matmul(g, x, weight, scale, half)
    if fmt.op == MATMUL_NBITS:
        return g.op(MATMUL_NBITS, x, weight, scale, domain=CONTRIB_DOMAIN, K=inputs, N=outputs, bits=fmt.bits,
                    block_size=fmt.block_size, accuracy_level=INT8_COMPUTE)
    blocks = {"axis": 1} if fmt.block_size is None else {"axis": 0, "block_size": fmt.block_size}
    return g.op("MatMul", x, g.op("DequantizeLinear", weight, scale, **blocks))


def _dynamic_int8_matmul(g, x: str, weight: str, scale: str, half: bool) -> str:
    """DynamicQuantizeMatMul quantizes all of x with one scale and zero point. Dividing each token
    by its own max |x| first (and multiplying its outputs back) gives every token the full 8 bits:
    one outlier token (relu^2 outputs are heavy-tailed) no longer coarsens every other token's
    steps. (The tensor's range, [-1, 1] or a part of it, still comes from all the tokens of the step.)"""
    x32 = g.op("Cast", x, to=TensorProto.FLOAT) if half else x
    floor = g.const("token_max_floor", np.array(np.finfo(np.float32).tiny, np.float32))  # an all-zero token
    # ReduceMax with an `axes` attribute: opset 17's form, which the `capacity` layout's graphs declare
    token_max = g.op("Max", g.op("ReduceMax", g.op("Abs", x32), axes=[-1], keepdims=1), floor)
    y = g.op(DYNAMIC_INT8, g.op("Div", x32, token_max), weight, scale, domain=CONTRIB_DOMAIN)
    y = g.op("Mul", y, token_max)
    return g.op("Cast", y, to=TensorProto.FLOAT16) if half else y


def scale_name(weight: str) -> str:
    return f"{weight}_scale"


def block_scales(rows: torch.Tensor, bits: int, block: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """[R, K] fp32 -> [R, K / block] scales (max |w| / qmax), rounded to how they are stored, so
    the codes are computed against the scale the runtime multiplies by."""
    qmax = 2 ** (bits - 1) - 1
    largest = rows.reshape(rows.shape[0], -1, block).abs().amax(-1)
    return (largest / qmax).to(scale_dtype)


def codes(rows: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, K] fp32 and [R, K / block] scales -> int8 codes [R, K], symmetric, round to nearest."""
    qmax = 2 ** (bits - 1) - 1
    block = rows.shape[1] // scales.shape[1]
    divisor = scales.float().repeat_interleave(block, dim=1)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)  # an all-zero block: codes 0
    return torch.round(rows / divisor).clamp_(-qmax, qmax).to(torch.int8)


def pack(codes_: torch.Tensor, bits: int, offset: int) -> np.ndarray:
    """Codes -> bytes, row-major, 4-bit pairs low nibble first (MatMulNBits' B and ONNX int4 agree).
    `offset`: added to each code (MatMulNBits' default zero point; 0 for signed ONNX int8/int4)."""
    stored = (codes_.to(torch.int16) + offset).to(torch.uint8).reshape(-1).numpy()
    if bits == 8:
        return stored
    stored = stored & 0x0F
    return stored[0::2] | (stored[1::2] << 4)


def dequantize(stored: np.ndarray, scales: np.ndarray, fmt: WeightFormat, shape: tuple[int, int]) -> np.ndarray:
    """The float [K, N] weight the graph multiplies by, from the stored codes and scales (the
    reference for tests; decoding as each op's definition says, independently of `pack`)."""
    inputs, outputs = shape
    raw = np.asarray(stored).reshape(-1).astype(np.uint8)
    if fmt.bits == 4:  # low nibble first
        raw = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1)
    values = raw.astype(np.int32)
    if fmt.op == MATMUL_NBITS:
        values = values - 2 ** (fmt.bits - 1)  # no zero_points input: the default zero point
        blocks = values.reshape(outputs, inputs // fmt.block_size, fmt.block_size)
        return (blocks * scales.astype(np.float64)[..., None]).reshape(outputs, inputs).T
    values = np.where(values >= 2 ** (fmt.bits - 1), values - 2 ** fmt.bits, values)  # two's complement
    values = values.reshape(inputs, outputs)
    if fmt.block_size is None:
        return values * scales.astype(np.float64)[None, :]
    return values * np.repeat(scales.astype(np.float64), fmt.block_size, axis=0)


def _check_finite(name: str, chunk: torch.Tensor) -> float:
    """max |chunk|, after refusing NaN/inf in it."""
    low, high = torch.aminmax(chunk)  # NaN propagates, inf shows as an extreme: one pass
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise QuantizeError(f"checkpoint tensor {name!r} holds NaN/inf values; the checkpoint is corrupt (or training "
                            f"diverged): refusing to build a model that computes garbage")
    return max(-float(low), float(high))


def _rows_per_chunk(row_elements: int, multiple: int = 1) -> int:
    rows = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    return max(multiple, rows - rows % multiple)


def write_quantized(writer, name: str, tensor: torch.Tensor, fmt: WeightFormat, scale_dtype: torch.dtype,
                    factor: float = 1.0) -> list[TensorProto]:
    """Stream checkpoint weight `tensor` ([N, K]) into `writer` as codes and scales (times `factor`,
    the relu^2 folding); returns the two initializers. max |W| is recorded for fp16 builds."""
    outputs, inputs = tensor.shape
    record = scale_dtype == torch.float16  # the range report lists max |W| of what fp16 graphs compute with
    if fmt.op == MATMUL_NBITS:
        blob = fmt.block_size * fmt.bits // 8
        scales, dims = [], [outputs, inputs // fmt.block_size, blob]
        start = writer.begin()
        for chunk in _float_chunks(writer, name, tensor, factor, _rows_per_chunk(inputs), record):
            chunk_scales = block_scales(chunk, fmt.bits, fmt.block_size, scale_dtype)
            writer.write(pack(codes(chunk, chunk_scales, fmt.bits), fmt.bits, 2 ** (fmt.bits - 1)))
            scales.append(chunk_scales)
        data = writer.external(name, dims, TensorProto.UINT8, start)
        scale = torch.cat(scales)
    else:
        data, scale = _write_dequantize_codes(writer, name, tensor, fmt, scale_dtype, factor)
    if not torch.isfinite(scale).all():  # a block max |w| / qmax past the scale type's range: all codes 0
        raise QuantizeError(f"checkpoint tensor {name!r} has weights too large for {fmt.type} scales stored in "
                            f"{scale_dtype} (max |w| / {2 ** (fmt.bits - 1) - 1} overflows): build with --dtype float32")
    return [data, writer.add_stored(scale_name(name), scale)]


def _write_dequantize_codes(writer, name, tensor, fmt, scale_dtype, factor) -> tuple[TensorProto, torch.Tensor]:
    """TensorRT's layout: codes [K, N] (signed int8/int4), written in chunks of K; scales
    [K / block, N] (blocked) or [N] (per output channel, from a first pass over the rows)."""
    outputs, inputs = tensor.shape
    record = scale_dtype == torch.float16
    per_channel = fmt.block_size is None
    if per_channel:
        rows = _float_chunks(writer, name, tensor, factor, _rows_per_chunk(inputs), record)
        channel_scales = torch.cat([block_scales(chunk, fmt.bits, inputs, scale_dtype) for chunk in rows])  # [N, 1]
    scales = []
    start = writer.begin()
    columns = tensor.T  # [K, N]: chunks of whole blocks of K, so every block's scale is local
    for chunk in _float_chunks(writer, name, columns, factor, _rows_per_chunk(outputs, fmt.block_size or 2),
                               record):
        by_output = chunk.T.contiguous()  # [N, rows]: blocks along the last axis
        chunk_scales = channel_scales if per_channel else block_scales(by_output, fmt.bits, fmt.block_size, scale_dtype)
        writer.write(pack(codes(by_output, chunk_scales, fmt.bits).T.contiguous(), fmt.bits, 0))
        if not per_channel:
            scales.append(chunk_scales.T)
    data_type = TensorProto.INT8 if fmt.bits == 8 else TensorProto.INT4
    data = writer.external(name, [inputs, outputs], data_type, start)
    return data, channel_scales.reshape(-1) if per_channel else torch.cat(scales)


def _float_chunks(writer, name, source: torch.Tensor, factor: float, rows: int, record_largest: bool):
    """fp32 chunks of `rows` rows of `source`, scaled and checked; max |W| recorded for fp16 builds."""
    for i in range(0, source.shape[0], rows):
        chunk = source[i:i + rows].float()
        if factor != 1.0:
            chunk = chunk * factor
        largest = _check_finite(name, chunk)
        if record_largest:
            writer.largest[name] = max(writer.largest.get(name, 0.0), largest)
        yield chunk

