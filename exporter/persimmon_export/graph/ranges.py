"""The range report of a float16 build (issue 13): how close each tensor the fp16 graph stores
comes to float16's largest finite value, 65504.

The fp32 torch reference (`model.py`) runs the calibration prompts with forward hooks on its
modules; each hook keeps the largest |x| per layer at one tensor kind (`KINDS`). The exporter then
chooses each layer's relu^2 scale so that neither its W2*s^2 nor the measured relu^2 output /s^2
overflows (`Relu2Scales`), records max |W| of every tensor it stores in fp16 after that folding,
and `report` turns both into the manifest's `ranges` section. Measured on prompts, not proven:
other inputs can go higher, so the scale keeps the same factor-2 margin as the weights.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch

from persimmon_runtime.manifest import RANGE_KINDS, RangeSection, WeightRange
from persimmon_runtime.regular_files import check_regular

from ..config import PersimmonConfig
from ..load.checkpoint import load_model
from ..progress import Steps
from ..reference.model import PersimmonForCausalLM, partial_rotary, qk_layernorm
from .export import RELU2_WEIGHT_LIMIT, ExportError

log = logging.getLogger(__name__)
FP16_MAX = float(np.finfo(np.float16).max)
# a stored value past half of 65504 leaves no room for the next addition: the margin the weights keep
FP16_MARGIN_LIMIT = RELU2_WEIGHT_LIMIT
MAX_CALIBRATION_PROMPTS = 64
MAX_PROMPT_CHARS = 4000
MAX_PROMPT_TOKENS = 512  # per prompt: a calibration run stays seconds on small models
# Varied on purpose: chat turns, code, digits, other scripts, repetition (repeated tokens drive
# attention scores up), byte-fallback symbols.
BUILTIN_PROMPTS = (
    "human: What is the capital of France?\n\nadept:",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "3.14159 2.71828 1.41421 1234567890 0x7fff -65504 1e-5",
    "Der schnelle braune Fuchs springt über den faulen Hund. 東京は日本の首都です。",
    "the the the the the the the the the the the the the the the the",
    "🎉 ∑ ∞ → ← ≤ ≥ ≠ ☃ «quoted» [brackets] {braces} <tags>",
)
# Per layer, what the fp16 graph stores in fp16 (scaled as the build stores it); logits: one value.
KINDS = RANGE_KINDS


class CalibrationError(ExportError):
    pass


def read_calibration_file(path: str) -> list[str]:
    """The prompts of a calibration file: one per line, blank lines skipped, bounded in count and length."""
    try:
        check_regular(path, "--calibration-file")  # a FIFO would wait for a writer
        with open(path, encoding="utf-8") as f:
            lines = f.read(MAX_CALIBRATION_PROMPTS * (MAX_PROMPT_CHARS + 1) + 1).splitlines()
    except OSError as e:
        raise CalibrationError(f"--calibration-file {path}: cannot be read ({e.strerror}); pass a text file "
                               f"with one prompt per line") from None
    except UnicodeDecodeError as e:
        raise CalibrationError(f"--calibration-file {path}: not UTF-8 text (byte {e.start}); save it as UTF-8, "
                               f"one prompt per line") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise CalibrationError(f"--calibration-file {path}: holds no prompt; write one prompt per line")
    if len(prompts) > MAX_CALIBRATION_PROMPTS:
        raise CalibrationError(f"--calibration-file {path}: {len(prompts)}+ prompts, at most "
                               f"{MAX_CALIBRATION_PROMPTS}; keep a varied few")
    too_long = next((n for n, line in enumerate(lines, 1) if len(line) > MAX_PROMPT_CHARS), None)
    if too_long is not None:
        raise CalibrationError(f"--calibration-file {path}: line {too_long} is longer than {MAX_PROMPT_CHARS} "
                               f"characters; shorten it (prompts are cut at {MAX_PROMPT_TOKENS} tokens anyway)")
    return prompts


class Measured:
    """Largest |x| per layer and kind in the fp32 reference, before any relu^2 scale."""

    def __init__(self, layers: int):
        self.per_layer = {kind: [0.0] * layers for kind in KINDS}
        self.relu2_input = [0.0] * layers  # largest positive pre-activation: what relu^2 squares
        self.logits = 0.0
        self.prompts = self.tokens = 0
        self.source = "built-in"  # or the calibration file's name
        # filled by the export (`export_onnx`): what it stored
        # largest |key| (after rotary, as cached) and |value| per layer, per (head, head_dim) channel
        self.key_channels: list = [None] * layers
        self.value_channels: list = [None] * layers
        self.scales = [1.0] * layers  # relu^2 scale per layer
        self.weights: dict[str, float] = {}  # max |W| per tensor stored in fp16, after folding

    def keep(self, kind: str, layer: int, tensor: torch.Tensor) -> None:
        self.per_layer[kind][layer] = max(self.per_layer[kind][layer], _largest(tensor))

    def keep_channels(self, kind: str, layer: int, tensor: torch.Tensor) -> None:
        """Per-channel maxima of a [batch, heads, tokens, head_dim] tensor (kind: key or value)."""
        channels = getattr(self, f"{kind}_channels")
        largest = tensor.detach().abs().amax(dim=(0, 2)).numpy()  # [heads, head_dim]
        channels[layer] = largest if channels[layer] is None else np.maximum(channels[layer], largest)

    def check_relu2_scale(self, layer: int, s: float) -> None:
        """Refuse when, at the largest scale the layer's weights allow (the export's choice), its
        measured pre-activation /s or relu^2 output /s^2 passes the margin limit: a smaller scale
        would only make it worse."""
        relu2_input, pre_activation = self.relu2_input[layer], self.per_layer["mlp_pre_activation"][layer]
        relu2_output = (relu2_input / s) ** 2
        worst, tensor = max((pre_activation / s, "mlp_pre_activation"), (relu2_output, "mlp_activation"))
        if worst > FP16_MARGIN_LIMIT:
            raise CalibrationError(
                f"model.layers.{layer} {tensor} reaches {worst:.4g} in float16 at relu^2 scale {s:g} (measured on "
                f"the calibration prompts: pre-activation up to {max(relu2_input, pre_activation):.4g}), past "
                f"{FP16_MARGIN_LIMIT:g}, half of float16's 65504; "
                f"build with --dtype bfloat16 (for TensorRT) or --dtype float32")


def _largest(tensor: torch.Tensor) -> float:
    """max |x|; NaN if any element is NaN (torch's max propagates it)."""
    return float(tensor.detach().abs().max()) if tensor.numel() else 0.0


def measure(model: PersimmonForCausalLM, prompt_ids: list[list[int]]) -> Measured:
    """Run each prompt (alone: no padding) through the fp32 reference and keep the maxima."""
    config = model.config
    measured = Measured(config.num_hidden_layers)
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles += _hook_layer(layer, i, config, measured)
    try:
        with torch.no_grad(), Steps(log, "calibration", len(prompt_ids), "prompts", every=1) as step:
            for ids in prompt_ids:  # minutes at 8B in fp32: a line (or the bar) per prompt
                measured.logits = max(measured.logits, _largest(model(torch.tensor([ids]))))
                measured.prompts += 1
                measured.tokens += len(ids)
                step(f"{len(ids)} tokens")
    finally:
        for handle in handles:
            handle.remove()
    return measured


def _hook_layer(layer, i: int, config: PersimmonConfig, measured: Measured) -> list:
    attn, mlp, seen = layer.self_attn, layer.mlp, {}

    def layer_input(module, args):
        seen["x"] = args[0]

    def attention_input(module, args):  # (x_ln, position_ids, inv_freq, mask, cache_position)
        seen["position_ids"], seen["inv_freq"] = args[1], args[2]

    def projection(module, args, qkv):
        measured.keep("qkv", i, qkv)
        batch, seq, _ = qkv.shape
        q, k, v = qkv.view(batch, seq, attn.heads, 3, attn.head_dim).unbind(dim=3)
        if attn.q_layernorm is not None:
            q, k = qk_layernorm(q, k, attn.q_layernorm.weight, attn.q_layernorm.bias, attn.k_layernorm.weight,
                                attn.k_layernorm.bias, attn.eps)
        measured.keep("query", i, q)
        measured.keep("key", i, k)
        q, k = (partial_rotary(t, seen["position_ids"], seen["inv_freq"]).transpose(1, 2) for t in (q, k))
        measured.keep_channels("key", i, k)
        measured.keep_channels("value", i, v.transpose(1, 2))
        scores = torch.matmul(q * attn.head_dim ** -0.5, k.transpose(-1, -2))
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()  # the pairs softmax reads (no cache here)
        measured.keep("attention_scores", i, scores[..., causal])

    def attention_output(module, args, out):
        measured.keep("attention_output", i, out)
        measured.keep("residual", i, seen["x"] + out)

    def pre_activation(module, args, out):
        measured.keep("mlp_pre_activation", i, out)
        measured.relu2_input[i] = max(measured.relu2_input[i], float(out.max().clamp(min=0)))

    return [layer.register_forward_pre_hook(layer_input),
            attn.register_forward_pre_hook(attention_input),
            attn.query_key_value.register_forward_hook(projection),
            attn.register_forward_hook(attention_output),
            mlp.dense_h_to_4h.register_forward_hook(pre_activation),
            mlp.dense_4h_to_h.register_forward_pre_hook(lambda m, args: measured.keep("mlp_activation", i, args[0])),
            mlp.register_forward_hook(lambda m, args, out: measured.keep("mlp_output", i, out)),
            layer.register_forward_hook(lambda m, args, out: measured.keep("residual", i, out))]


def calibration_ids(tokenizer, prompts, max_tokens: int = MAX_PROMPT_TOKENS) -> list[list[int]]:
    """Token ids of each prompt as the runtime would feed it, cut at max_tokens."""
    return [tokenizer.encode(prompt)[:max_tokens] for prompt in prompts]


def check_measured(measured: Measured) -> None:
    """The fp32 reference itself must be finite on the calibration prompts."""
    if not math.isfinite(measured.logits):
        raise CalibrationError("the logits are NaN/inf in the fp32 reference on the calibration prompts: the "
                               "checkpoint is broken in any dtype")
    for kind, values in measured.per_layer.items():
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise CalibrationError(f"model.layers.{bad} {kind} is NaN/inf in the fp32 reference on the calibration "
                                   f"prompts: the checkpoint is broken in any dtype")


# measured kinds whose stored value depends on the relu^2 scale: checked at that scale, in the export
SCALED_KINDS = ("mlp_pre_activation", "mlp_activation")


def check_fp16_range(measured: Measured) -> None:
    """Refuse, before the export, a float16 build in which a tensor the graph stores in fp16 would
    overflow on the calibration prompts (the relu^2 tensors are checked at their scale later)."""
    places = [(v, f"model.layers.{i} {kind}") for kind, values in measured.per_layer.items()
              if kind not in SCALED_KINDS for i, v in enumerate(values)]
    largest, where = max(places + [(measured.logits, "logits")])
    if largest > FP16_MAX:
        raise CalibrationError(f"{where} reaches {largest:.4g} in the fp32 reference on the calibration prompts, past "
                               f"float16's largest value 65504: a float16 build would overflow there; build with "
                               f"--dtype bfloat16 (for TensorRT) or --dtype float32")


def report(measured: Measured) -> RangeSection:
    """The manifest's `ranges` section: maxima as the fp16 graph stores them, and the lowest headroom."""
    scales, weights = measured.scales, measured.weights
    stored = {kind: list(values) for kind, values in measured.per_layer.items()}
    stored["mlp_pre_activation"] = [v / s for v, s in zip(stored["mlp_pre_activation"], scales)]
    stored["mlp_activation"] = [v / (s * s) for v, s in zip(stored["mlp_activation"], scales)]
    places = [(v, f"model.layers.{i} {kind}") for kind, values in stored.items() for i, v in enumerate(values)]
    places += [(measured.logits, "logits")] + [(v, name) for name, v in weights.items()]
    largest, where = max(places)
    return RangeSection(
        calibration=measured.source, prompts=measured.prompts, tokens=measured.tokens, limit=FP16_MAX,
        relu2_scales=list(scales), activations=stored, logits=measured.logits,
        weights=[WeightRange(name, v) for name, v in weights.items()],
        lowest_headroom=FP16_MAX / max(largest, 1.0), lowest_at=where)  # below 1: headroom is at least 65504


def log_summary(section: RangeSection) -> None:
    """One line at the end of a build; a warning when some tensor comes within a factor 2 of 65504
    (a build that would overflow was refused before it was written)."""
    close = section.lowest_headroom < 2
    note = (f" - within a factor 2 of float16's limit: no overflow on the calibration prompts, but other inputs "
            f"may reach it; check with `persimmon-export parity --emulate` or build --dtype bfloat16" if close else "")
    log.log(logging.WARNING if close else logging.INFO,
            f"float16 range report ({section.prompts} prompts, {section.tokens} tokens, {section.calibration}): "
            f"lowest headroom {section.lowest_headroom:.3g}x at {section.lowest_at} (65504 / its max |x|); "
            "relu^2 scales " + ", ".join(f"{s:g}" for s in section.relu2_scales) + note)


def fp32_model_bytes(config: PersimmonConfig) -> int:
    """What the fp32 reference holds: 4 bytes a parameter (biases and norms ignored)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    return 4 * (2 * config.vocab_size * h + layers * (4 * h * h + 2 * h * config.intermediate_size))


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none: not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def calibrate(checkpoint: str, config: PersimmonConfig, tokenizer, calibration_file: str | None,
              kv_capacity: int, fp16: bool = True) -> Measured | None:
    """Load the checkpoint in fp32 (4 bytes a parameter: the build's largest memory use), run the
    calibration prompts, return the maxima (checked finite). None, with a warning, when the fp32
    model would not fit in the memory available: an 8B build needs about 35 GiB for it, and the
    streamed export itself needs far less; the relu^2 scales then come from the weights alone."""
    # read (and checked) even when the report is skipped below
    prompts = read_calibration_file(calibration_file) if calibration_file else list(BUILTIN_PROMPTS)
    needed, available = fp32_model_bytes(config), available_memory_bytes()
    if available is not None and needed * 1.25 > available:  # activations and the loader's copies on top
        log.warning(f"range report skipped: the fp32 reference needs about {needed / 2**30:.1f} GiB and "
                    f"{available / 2**30:.1f} GiB is available; the relu^2 scales are chosen from the weights alone "
                    f"(build on a machine with more memory to measure activations)")
        return None
    log.info(f"range report: running the fp32 reference on {len(prompts)} calibration prompts ...")
    ids = calibration_ids(tokenizer, prompts, min(MAX_PROMPT_TOKENS, kv_capacity))  # no longer than a build's row
    measured = measure(load_model(checkpoint, dtype="float32"), ids)
    if calibration_file:
        measured.source = os.path.basename(calibration_file)
    check_measured(measured)
    if fp16:
        check_fp16_range(measured)
    return measured
