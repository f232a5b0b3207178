"""The onnxruntime backend: the exported step graph, with the KV cache updated in place.

Each cache tensor is one OrtValue bound both as `past_*` input and as the matching `present_*`
output. TensorScatter sees the same buffer on both sides and skips its copy. A step over some of
the rows binds that block of rows by address (see `backends`). With the `capacity` cache layout
(onnxruntime builds) the caches hold all kv_capacity slots from `start` on and are never grown or
copied: GroupQueryAttention reads each row's slots up to its last new token, so a step costs what
its context needs, not what the capacity is (`persimmon_export.graph.attention`). np.zeros takes its
pages from the OS lazily, so slots no row has reached cost no memory. Builds with the older
`whole` layout get caches only as long as the context needs, grown in steps of CACHE_STEP slots
by copying every row, which stalls the step that crosses a step boundary: rebuild them.

A build with an int8 prefill graph (manifest `prefill`) gets a second session over the same caches
where `persimmon_runtime.cpu.choose_prefill` says so; a step of at least `prefill.min_tokens` new
tokens per row runs on it, each session with its own IO binding.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..cpu import choose_prefill
from ..errors import PersimmonError
from ..manifest import Manifest
from .step import check_step, parse_device, run_rows, step_feeds

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
CACHE_STEP = 256


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, build_dir: str, manifest: Manifest, device: str = "cpu", prefill: str = "auto"):
        self.manifest = manifest
        device_type = parse_device(device)[0]
        # checked before the sessions load; `prefill_kernels` says what runs the prompt steps and why
        use_prefill, unit, self.prefill_kernels = choose_prefill(prefill, manifest.prefill is not None, device_type)
        # Each session has its own threads, which by default spin a while after each run. The prefill
        # session's must not: they took the cores from the decode steps after a prompt (decode at half
        # speed). The decode session's keep spinning, as in builds without a prefill graph (turning it
        # off measured -14%..+15% decode, within this VM's drift: docs/benchmarks.md)
        self._ort, self.session, (self.device_type, self.device_id) = open_session(build_dir, manifest, device)
        self.prefill_session = None
        if use_prefill:
            self.prefill_session = open_session(build_dir, manifest, device, manifest.prefill.file,
                                                exact_u8s8=unit is None, spinning=False)[1]
        self._bindings = {}  # session -> its _Binding, made by start()
        self._step_inputs = manifest.step_inputs  # read once: step() runs per token
        self.prefill_steps = 0  # steps run on the prefill graph (parity picks its bounds by it)
        self.caches = []
        self.batch = 0

    @property
    def max_step_tokens(self) -> int:
        return self.manifest.kv_capacity

    def start(self, batch: int) -> None:
        """Zeroed caches for `batch` rows."""
        if not 1 <= batch <= self.manifest.max_batch:
            raise PersimmonError(f"batch {batch} is outside 1..max_batch={self.manifest.max_batch} of this build")
        self._logits = np.empty((batch, self.manifest.model.vocab_size), np.float32)  # see _Binding.logits_rows
        self._bindings = {session: _Binding(session.io_binding(), self._logits, self.manifest.logits_shape[1:])
                          for session in (self.session, self.prefill_session) if session is not None}
        self.batch, self.slots = batch, 0
        self.caches = []
        self._host_caches = []  # on CPU the OrtValues borrow these arrays: keep them alive
        self.layout = self.manifest.onnx.cache_layout
        self._allocate(CACHE_STEP if self.layout == "whole" else self.manifest.kv_capacity)

    def _allocate(self, slots: int) -> None:
        """(Re)allocate caches of `slots` slots, keeping what the current ones hold."""
        heads, capacity, head_dim = self.manifest.cache_shape
        slots = min(slots, capacity)
        dtype = NUMPY_DTYPES[self.manifest.cache_dtype]
        # copies, taken while the old caches live: on CPU numpy() is a view of a host array that
        # the reassignment below frees (reading it afterwards read freed memory, or crashed)
        old = [np.array(value.numpy()) for value in self.caches]
        self.caches, self._host_caches = [], []
        for index in range(len(self.manifest.cache_aliases)):
            host = np.zeros((self.batch, heads, slots, head_dim), dtype)
            if old:
                host[:, :, :old[index].shape[2]] = old[index]
            self._host_caches.append(host)
            self.caches.append(self._ort.OrtValue.ortvalue_from_numpy(host, self.device_type, self.device_id))
        self.slots = slots
        for bound in self._bindings.values():
            bound.rows = None

    def _bind_rows(self, bound: "_Binding", first_row: int, rows: int) -> None:
        """Bind rows first_row .. first_row + rows - 1 of every cache as both past and present."""
        if bound.rows == (first_row, rows, self.slots):
            return
        heads, _, head_dim = self.manifest.cache_shape
        dtype = NUMPY_DTYPES[self.manifest.cache_dtype]
        shape = (rows, heads, self.slots, head_dim)
        offset = first_row * heads * self.slots * head_dim * np.dtype(dtype).itemsize
        for value, (present, past) in zip(self.caches, self.manifest.cache_aliases.items()):
            address = value.data_ptr() + offset
            bound.binding.bind_input(past, self.device_type, self.device_id, dtype, shape, address)
            bound.binding.bind_output(present, self.device_type, self.device_id, dtype, shape, address)
        bound.rows = (first_row, rows, self.slots)

    def step(self, input_ids, first_slot, token_count, attention_mask, first_row: int = 0) -> np.ndarray:
        check_step(self.manifest, self.batch, input_ids, first_slot, token_count, attention_mask, first_row)
        if self.layout == "whole":  # reads whole caches (mask width = cache length), writes seq slots per row
            needed = max(attention_mask.shape[1], int(first_slot.max()) + input_ids.shape[1])
            if needed > self.slots:
                self._allocate(-(-needed // CACHE_STEP) * CACHE_STEP)
            padded = np.ones((attention_mask.shape[0], self.slots), np.int64)  # later slots: causally masked
            padded[:, :attention_mask.shape[1]] = attention_mask
            attention_mask = padded
        return run_rows(self._run, self.layout, input_ids, first_slot, token_count, attention_mask, first_row)

    def _run(self, input_ids, first_slot, token_count, attention_mask, first_row: int) -> np.ndarray:
        """One session run over cache rows first_row .. first_row + len(input_ids) - 1: the prefill
        graph's for a step at least its min_tokens wide (new tokens per row, padding included),
        where it is in use."""
        prompt_step = self.prefill_session is not None and input_ids.shape[1] >= self.manifest.prefill.min_tokens
        session = self.prefill_session if prompt_step else self.session
        self.prefill_steps += prompt_step
        bound = self._bindings[session]
        self._bind_rows(bound, int(first_row), input_ids.shape[0])
        # held in a local until the run ends: the binding borrows their memory
        arrays = step_feeds(self._step_inputs, input_ids, first_slot, token_count, attention_mask)
        for name, value in arrays.items():
            bound.binding.bind_cpu_input(name, value)
        logits = bound.logits_rows(input_ids.shape[0])
        session.run_with_iobinding(bound.binding)
        return logits.copy()  # the buffer is written again by the next step


class _Binding:
    """One session's IO binding and what is bound in it now (bound again only on a change)."""

    def __init__(self, binding, logits: np.ndarray, row_shape: list):
        self.binding, self.logits, self.row_shape = binding, logits, tuple(row_shape)  # a row: [vocab] or [1, vocab]
        self.rows = None          # (first_row, rows, slots) of the cache blocks bound now
        self.logits_bound = 0     # rows of `logits` bound as the output now

    def logits_rows(self, rows: int) -> np.ndarray:
        """The first `rows` rows of one reused output buffer, bound by address: a fresh output every
        step (what ORT allocates otherwise; 8 MB at 8 rows of vocabulary 262,144) costs its page
        faults every step. Bound again only when the step's row count changes."""
        if rows != self.logits_bound:
            self.binding.bind_output("logits", "cpu", 0, np.float32, (rows, *self.row_shape),
                                     self.logits.ctypes.data)
            self.logits_bound = rows
        return self.logits[:rows]


def open_session(build_dir: str, manifest: Manifest, device: str = "cpu", graph_file: str | None = None,
                 exact_u8s8: bool = False, spinning: bool = True):
    """(the onnxruntime module, an InferenceSession of the build's graph - or of `graph_file`, its
    prefill graph -, (device type, id)) on `device`; one-line errors for a dtype onnxruntime cannot
    run, no onnxruntime, no CUDA provider. exact_u8s8: u8 x u8 kernels for the int8 products (a CPU
    without VNNI/AMX, see `persimmon_runtime.cpu`); spinning: its threads spin after a run."""
    if manifest.dtype not in NUMPY_DTYPES:  # bfloat16: onnxruntime 1.32's CPU provider has no bf16 MatMul
        raise PersimmonError(f"{build_dir}: a {manifest.dtype} build does not run on onnxruntime (no bfloat16 "
                             f"MatMul on its CPU provider); run its TensorRT engine on a GPU (--backend "
                             f"tensorrt), or rebuild with --dtype float16 or float32 for onnxruntime")
    try:
        import onnxruntime as ort
    except ImportError:
        raise PersimmonError("onnxruntime is not installed: pip install onnxruntime "
                             "(or onnxruntime-gpu for CUDA)") from None
    device_type, device_id = parse_device(device)
    if device_type == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise PersimmonError(f"device {device!r}: this onnxruntime has no CUDA execution provider "
                                 f"(has {ort.get_available_providers()}); install onnxruntime-gpu or use 'cpu'")
        providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if exact_u8s8:
        options.add_session_config_entry("session.x64quantprecision", "1")
    path = os.path.join(build_dir, graph_file or manifest.onnx.file)
    try:
        session = ort.InferenceSession(path, options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... (not PersimmonError)
        raise PersimmonError(f"{path}: onnxruntime {ort.__version__} cannot load this build "
                             f"({manifest.onnx.versions()}): {_reason(e)}; {_load_advice(manifest, e)}") from None
    _check_graph(path, manifest, session)
    return ort, session, (device_type, device_id)


ORT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)", "float16": "tensor(float16)",
             "bfloat16": "tensor(bfloat16)", "int8": "tensor(int8)"}


def _check_graph(path: str, manifest: Manifest, session) -> None:
    """The graph must have the I/O the manifest describes - names, types, fixed dimensions - or the
    first step fails inside onnxruntime (a build whose manifest was edited with its checksums)."""
    graph = {node.name: node for node in [*session.get_inputs(), *session.get_outputs()]}
    for spec in [*manifest.onnx.inputs, *manifest.onnx.outputs]:
        node = graph.get(spec.name)
        if node is None:
            raise PersimmonError(f"{path}: the graph has no {spec.name!r}, which the manifest names; the build is "
                                 f"inconsistent, rebuild it")
        fixed = [(want, got) for want, got in zip(spec.shape, node.shape) if isinstance(want, int) and
                 isinstance(got, int)]
        if node.type != ORT_TYPES[spec.dtype] or len(node.shape) != len(spec.shape) or \
                any(want != got for want, got in fixed):
            raise PersimmonError(f"{path}: the graph's {spec.name!r} is {node.type} {node.shape}, the manifest says "
                                 f"{spec.dtype} {spec.shape}; the build is inconsistent, rebuild it")


def _load_advice(manifest: Manifest, error: Exception) -> str:
    if manifest.cache_dtype == "int8" and "int8" in str(error):  # GroupQueryAttention's quantized cache
        return "its int8 KV cache (build --kv-cache int8) needs onnxruntime 1.31 or newer (checked: 1.31.1, 1.32; " \
               "pip install -U onnxruntime, docs/quantization.md)"
    if not re.search(r"IR version|opset", str(error), re.IGNORECASE):
        return "the build may be damaged: rebuild it with `persimmon-export build`"
    if manifest.onnx.ir_version is None:  # written with whatever IR version onnx chose (14 with onnx 1.23)
        return "rebuild it with this persimmon-export, which writes the lowest IR version and opsets a build " \
               "needs (docs/compatibility.md)"
    return "install an onnxruntime that reads them: 1.31.1 and 1.32 load every build this exporter writes, 1.23 " \
           "those of IR <= 11 (pip install -U onnxruntime, or onnxruntime-gpu for CUDA; docs/compatibility.md)"


def _reason(error: Exception) -> str:
    """onnxruntime's reason, without its status prefix, the path and the C++ source location."""
    text = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .* failed:", "", text)
    text = re.sub(r"/\S+\.(cc|h):\d+ \S+\(.*?\) ", "", text)  # '/onnxruntime_src/.../model.cc:181 Model::Model(...) '
    return text[:300]
