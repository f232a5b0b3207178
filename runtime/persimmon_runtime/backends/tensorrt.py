"""The TensorRT backend: one engine step over device-resident caches.

- The cache buffers are allocated once per batch and bound both as `past_*` input and as the
  `present_*` output that `engine.get_aliased_input_tensor` pairs with it (the KV-cache-update
  layer writes in place). Engines built with the ScatterElements fallback (TensorRT < 10.15)
  have no alias: each cache tensor then has two buffers that swap roles every step.
- The manifest records which optimization profile serves prefill and which decode (by role);
  the context switches profile when the step kind changes.
- Decode steps replay a CUDA graph. Correctness rests only on what TensorRT and CUDA document: a
  captured enqueue replays as captured, so it is valid while the context's profile, input shapes
  and tensor addresses stay as they were. So there is one graph, of the current binding; the next
  rebinding (a prefill, another set of rows, the next width bucket) destroys it, and the first
  decode step after it runs eagerly and is captured. The attention mask width is rounded up to a
  multiple of `KV_BUCKET` (the extra slots lie ahead of every query, so causality masks them), so
  one graph serves up to KV_BUCKET consecutive steps. A context that cannot be captured
  (`is_stream_capturable`), a capture CUDA invalidates or an instantiation that fails turns graphs
  off for the backend: steps continue without them. TensorRT-RTX engines use RTX's own CUDA graphs
  instead (IRuntimeConfig's whole-graph capture, which follows shape changes itself).
- The engine file is streamed into TensorRT (IStreamReaderV2), not read whole into host memory
  first (an 8B engine is ~17.5 GiB).
"""

from __future__ import annotations

import importlib
import logging
import os
import re

import numpy as np

from ..errors import PersimmonError
from ..manifest import EngineSection, Manifest, PluginPtx
from .cuda import check, compute_capability, cudart
from .step import check_step, parse_device

log = logging.getLogger(__name__)
KV_BUCKET = 64
READ_CHUNK = 256 << 20  # bytes handed to TensorRT per read while it deserializes an engine
# bytes per cache element of each build dtype (the caches never leave the GPU, so bfloat16 needs no
# numpy type here)
CACHE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def parse_version(text: str) -> tuple[int, ...]:
    """'10.15.1.29' -> (10, 15, 1, 29); a non-numeric tail ends it ('11.0.0rc1' -> (11, 0, 0))."""
    parts = []
    for piece in str(text).split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):
            break
    if len(parts) < 2:
        raise PersimmonError(f"cannot read the TensorRT version {text!r}")
    return tuple(parts)


# manifest `tensorrt.flavor` -> (module, product, how to install its runtime)
ENGINE_RUNTIMES = {
    "tensorrt": ("tensorrt", "TensorRT", "pip install tensorrt from NVIDIA's index, or an NGC container"),
    "tensorrt-rtx": ("tensorrt_rtx", "TensorRT-RTX", "pip install tensorrt-rtx-cu12"),
}


def engine_runtime(section: EngineSection) -> tuple[str, str, str]:
    """(module, product, install hint) of the TensorRT that runs this engine."""
    return ENGINE_RUNTIMES[section.flavor]


def where_engine_runs(section: EngineSection) -> str:
    """Which software and GPUs can run the engine, e.g. 'TensorRT-RTX 1.7.1.116 on a GPU of compute
    capability 8.6, 8.9 or 12.0'."""
    _, product, _ = engine_runtime(section)
    software = f"{product} {section.version}" + (" or newer" if section.version_compatible else "")
    gpus = section.compute_capabilities
    if not gpus:
        return f"{software} on the kind of GPU that built it"
    return f"{software} on a GPU of compute capability " + (
        gpus[0] if len(gpus) == 1 else f"{', '.join(gpus[:-1])} or {gpus[-1]}")


def check_engine_compatible(section: EngineSection, installed: str, capability: str) -> None:
    """Refuse, with where the engine can run, an engine this machine cannot run."""
    flavor = section.flavor
    built, product = section.version, engine_runtime(section)[1]
    rebuild = f"rebuild it here with `persimmon-export build --backend {flavor}`"
    where = f"engine.plan runs on {where_engine_runs(section)}"
    if section.version_compatible:
        if parse_version(installed)[:2] < parse_version(built)[:2]:
            raise PersimmonError(f"{where} (version compatible); this machine has {product} {installed}: {rebuild}")
    elif parse_version(installed)[:3] != parse_version(built)[:3]:
        hint = "" if flavor == "tensorrt-rtx" else \
            ", or build with --version-compatible for engines that must load on newer TensorRT"
        raise PersimmonError(f"{where}; this machine has {product} {installed}: {rebuild}{hint}")
    targets = section.compute_capabilities
    if targets and capability != "unknown" and capability not in targets:
        if flavor == "tensorrt-rtx":  # it targets RTX-class GPUs only (not Hopper, for one)
            rebuild = (f"rebuild it with `persimmon-export build --backend tensorrt-rtx --compute-capabilities "
                       f"{capability}` if TensorRT-RTX targets this GPU, else with `--backend tensorrt` here")
        raise PersimmonError(f"{where}; this GPU has compute capability {capability}: {rebuild}")


def check_driver_runs_plugin_ptx(ptx: PluginPtx | None, driver_version: int) -> None:
    """Refuse an engine whose plugin PTX (None: no plugins) this driver cannot JIT-compile.
    `driver_version` is cudaDriverGetVersion's (12040: CUDA 12.4); PTX JIT has no minor-version
    compatibility."""
    if ptx is None:
        return
    needed = parse_version(ptx.min_driver_cuda)[:2]
    has = (driver_version // 1000, driver_version % 1000 // 10)
    if has < needed:
        need, have = ".".join(map(str, needed)), ".".join(map(str, has))
        raise PersimmonError(f"engine.plan holds plugin kernels as PTX ISA {ptx.isa}, which needs an NVIDIA driver "
                             f"for CUDA {need} or newer; this machine's driver supports CUDA {have}: update the "
                             f"driver, or rebuild with an nvcc from CUDA {have} or older, or with --plugins off")


def _checked(ok, what: str) -> None:
    """TensorRT's setters return False (and log why) instead of raising."""
    if not ok:
        raise PersimmonError(f"TensorRT refused {what} (see the TensorRT log above); the engine does not fit this "
                             f"build's manifest: rebuild it")


def deserialize(trt, runtime, path: str):
    """The engine at `path`, streamed to TensorRT in READ_CHUNK pieces where it takes a reader
    (IStreamReaderV2: TensorRT >= 10.7, TensorRT-RTX), else read whole."""
    with open(path, "rb") as f:
        reader = engine_reader(trt, f)
        return runtime.deserialize_cuda_engine(reader if reader is not None else f.read())


def engine_reader(trt, file):
    """An IStreamReaderV2 over an open binary file, or None where this TensorRT has none."""
    base = getattr(trt, "IStreamReaderV2", None)
    if base is None:
        return None
    whence = {trt.SeekPosition.SET: os.SEEK_SET, trt.SeekPosition.CUR: os.SEEK_CUR, trt.SeekPosition.END: os.SEEK_END}

    class EngineFile(base):
        def __init__(self):
            base.__init__(self)

        def read(self, num_bytes: int, stream: int) -> bytes:  # fewer bytes than asked is allowed
            return file.read(min(num_bytes, READ_CHUNK))

        def seek(self, offset: int, where) -> bool:
            try:
                file.seek(offset, whence[where])
                return True
            except (OSError, ValueError, KeyError):
                return False

    return EngineFile()


def create_context(trt, engine, shown_as: str):
    """(execution context, whether the runtime captures CUDA graphs itself): TensorRT-RTX does with
    a runtime config asking for whole-graph capture; NVIDIA TensorRT has none. TensorRT returns
    None, not an error, when it cannot make one (out of device memory): that is one line here."""
    strategy = getattr(getattr(trt, "CudaGraphStrategy", None), "WHOLE_GRAPH_CAPTURE", None)
    native = strategy is not None and hasattr(engine, "create_runtime_config")
    if native:
        config = engine.create_runtime_config()
        config.cuda_graph_strategy = strategy
        context = engine.create_execution_context(config)
    else:
        context = engine.create_execution_context()
    if context is None:
        raise PersimmonError(f"{shown_as}: TensorRT could not create an execution context (out of GPU memory?); "
                             f"free GPU memory or use a GPU with more")
    return context, native


class _Buffer:
    def __init__(self, rt, nbytes: int):
        self.rt, self.nbytes = rt, max(1, nbytes)
        self.ptr = int(check(rt.cudaMalloc(self.nbytes), "cudaMalloc"))

    def upload(self, array: np.ndarray, stream) -> None:
        array = np.ascontiguousarray(array)
        check(self.rt.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "copy to device")

    def free(self) -> None:
        if self.ptr:
            self.rt.cudaFree(self.ptr)
            self.ptr = 0


class TensorRTBackend:
    name = "tensorrt"
    prefill_kernels = "the engine's prefill profile"

    def __init__(self, build_dir: str, manifest: Manifest, device: str = "cuda"):
        section = manifest.tensorrt
        if not section:
            raise PersimmonError(f"{build_dir}: this build has no TensorRT engine; rebuild it with "
                                 f"`persimmon-export build --backend tensorrt`")
        module, _, install = engine_runtime(section)
        try:
            trt = importlib.import_module(module)
        except ImportError:
            raise PersimmonError(f"{module} is not installed: {section.engine_file} runs on "
                                 f"{where_engine_runs(section)} ({install})") from None
        kind, index = parse_device(device)
        if kind != "cuda":
            raise PersimmonError(f"device {device!r}: the TensorRT backend runs on 'cuda' or 'cuda:N'")
        self.rt = rt = cudart()
        self.device_index = index
        check(rt.cudaSetDevice(index), "cudaSetDevice")
        check_driver_runs_plugin_ptx(section.plugin_ptx, check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion"))
        check_engine_compatible(section, trt.__version__, compute_capability())
        self.manifest = manifest
        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if section.version_compatible:
            runtime.engine_host_code_allowed = True  # version-compatible engines embed their lean runtime
        self.engine = deserialize(trt, runtime, os.path.join(build_dir, section.engine_file))
        if self.engine is None:
            raise PersimmonError(f"{build_dir}/{section.engine_file}: TensorRT could not deserialize the engine")
        self.context, native_graphs = create_context(trt, self.engine, f"{build_dir}/{section.engine_file}")
        self.stream = check(rt.cudaStreamCreate(), "cudaStreamCreate")
        aliases = manifest.cache_aliases
        get_alias = getattr(self.engine, "get_aliased_input_tensor", None)
        self.in_place = get_alias is not None and all(get_alias(out) == past for out, past in aliases.items())
        if self.in_place != (section.cache_update == "tensor_scatter"):
            raise PersimmonError(f"{build_dir}/{section.engine_file}: the engine's caches are "
                                 f"{'' if self.in_place else 'not '}updated in place, but the manifest records "
                                 f"cache_update {section.cache_update!r}; the build is inconsistent, rebuild it")
        self.prefill_profile, self.decode_profile = section.profile_index("prefill"), section.profile_index("decode")
        self.cuda_graphs = not native_graphs  # ours, until a capture fails (see _capture)
        self.graph, self.bound = None, None  # the CUDA graph of the current binding, and that binding
        self.profile = None
        self.buffers: dict[str, _Buffer] = {}
        self.batch = 0

    @property
    def max_step_tokens(self) -> int:
        return self.manifest.tensorrt.max_prefill

    def start(self, batch: int) -> None:
        """Device buffers for `batch` sequences: caches zeroed, inputs at their largest shapes."""
        m = self.manifest
        if not 1 <= batch <= m.max_batch:
            raise PersimmonError(f"batch {batch} is outside 1..max_batch={m.max_batch} of this build")
        self.close()
        rt, stream = self.rt, self.stream
        check(rt.cudaSetDevice(self.device_index), "cudaSetDevice")  # the current device is per thread
        self.row_bytes = int(np.prod(m.cache_shape)) * CACHE_ITEMSIZE[m.dtype]
        cache_bytes = batch * self.row_bytes
        names = list(m.cache_inputs) + ([] if self.in_place else list(m.cache_aliases))
        for name in names:
            self.buffers[name] = _Buffer(rt, cache_bytes)
            check(rt.cudaMemsetAsync(self.buffers[name].ptr, 0, cache_bytes, stream), "cudaMemsetAsync")
        prefill = self.manifest.tensorrt.max_prefill
        for name, elements in (("input_ids", batch * prefill), ("first_slot", batch), ("token_count", batch),
                               ("attention_mask", batch * m.kv_capacity)):
            self.buffers[name] = _Buffer(rt, elements * 8)
        self.buffers["logits"] = _Buffer(rt, batch * m.model.vocab_size * 4)
        self.batch = batch

    def step(self, input_ids, first_slot, token_count, attention_mask, first_row: int = 0) -> np.ndarray:
        # before any upload: the buffers hold self.batch rows and the KV-cache-update layer
        # writes out of bounds past the capacity
        check_step(self.manifest, self.batch, input_ids, first_slot, token_count, attention_mask, first_row)
        first_row = int(first_row)
        batch, seq = input_ids.shape
        if seq > self.manifest.tensorrt.max_prefill:
            raise PersimmonError(f"{seq} new tokens in one step exceed the engine's max_prefill "
                                 f"{self.manifest.tensorrt.max_prefill}")
        rt, stream, context = self.rt, self.stream, self.context
        check(rt.cudaSetDevice(self.device_index), "cudaSetDevice")  # a scheduler steps on its own thread
        decoding = seq == 1
        profile = self.decode_profile if decoding else self.prefill_profile
        width = attention_mask.shape[1]
        if decoding:  # a bucketed width lets one CUDA graph serve many steps
            width = min(self.manifest.kv_capacity, -(-width // KV_BUCKET) * KV_BUCKET)
        mask = np.ones((batch, width), np.int64)
        mask[:, :attention_mask.shape[1]] = attention_mask
        inputs = {"input_ids": np.asarray(input_ids, np.int64), "first_slot": np.asarray(first_slot, np.int64),
                  "token_count": np.asarray(token_count, np.int64), "attention_mask": mask}
        for name, array in inputs.items():
            self.buffers[name].upload(array, stream)
        self._enqueue((profile, batch, seq, width, first_row), inputs, decoding)
        logits = np.empty((batch, self.manifest.model.vocab_size), np.float32)
        check(rt.cudaMemcpyAsync(logits.ctypes.data, self.buffers["logits"].ptr, logits.nbytes,
                                 rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "copy logits")
        check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        if not self.in_place:  # fallback engines: this step's present is the next step's past
            self._carry_present(first_row, batch)
        return logits

    def _carry_present(self, first_row: int, rows: int) -> None:
        """Make what the step wrote (its rows of each present cache) the past of the next step."""
        aliases = self.manifest.cache_aliases.items()
        if rows == self.batch:  # every row was written: swapping the buffers is free
            self.bound = None  # (the next step binds the swapped addresses)
            for present, past in aliases:
                self.buffers[present], self.buffers[past] = self.buffers[past], self.buffers[present]
            return
        offset, size = first_row * self.row_bytes, rows * self.row_bytes
        for present, past in aliases:  # the other rows' past must survive: copy this block alone
            check(self.rt.cudaMemcpyAsync(self.buffers[past].ptr + offset, self.buffers[present].ptr + offset, size,
                                          self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream), "copy cache")
        check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def _enqueue(self, binding: tuple, inputs: dict, decoding: bool) -> None:
        """Run the step on the stream: replay the graph if it is of this binding; else (re)bind,
        which ends the old graph, run eagerly and, for a decode step, capture it."""
        rt, stream = self.rt, self.stream
        if binding != self.bound:
            self._drop_graph()
            self.bound = None  # a _bind that raises half-way leaves nothing to replay against
            profile, _, _, _, first_row = binding
            self._bind(profile, inputs, first_row)
            self.bound = binding
        if self.graph is not None:
            check(rt.cudaGraphLaunch(self.graph, stream), "cudaGraphLaunch")
            return
        if not self.context.execute_async_v3(stream_handle=int(stream)):
            raise PersimmonError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        if decoding and self.cuda_graphs and self.in_place:
            self._capture()

    def _bind(self, profile: int, inputs: dict, first_row: int) -> None:
        context, m = self.context, self.manifest
        if profile != self.profile:
            self.profile = None
            _checked(context.set_optimization_profile_async(profile, int(self.stream)),
                     f"set_optimization_profile_async({profile})")
            self.profile = profile
        for name, array in inputs.items():
            _checked(context.set_input_shape(name, array.shape), f"set_input_shape({name}, {array.shape})")
            _checked(context.set_tensor_address(name, self.buffers[name].ptr), f"set_tensor_address({name})")
        rows = inputs["input_ids"].shape[0]
        cache_shape, offset = (rows, *m.cache_shape), first_row * self.row_bytes
        for present, past in m.cache_aliases.items():
            _checked(context.set_input_shape(past, cache_shape), f"set_input_shape({past}, {cache_shape})")
            _checked(context.set_tensor_address(past, self.buffers[past].ptr + offset), f"set_tensor_address({past})")
            target = past if self.in_place else present  # an aliased output must share its input's memory
            _checked(context.set_tensor_address(present, self.buffers[target].ptr + offset),
                     f"set_tensor_address({present})")
        _checked(context.set_tensor_address("logits", self.buffers["logits"].ptr), "set_tensor_address(logits)")

    def _capture(self) -> None:
        """Record the step just run (the warm-up) as the graph of the current binding. Whatever
        CUDA or TensorRT refuses turns graphs off: the step already ran, the next ones run eagerly."""
        rt, stream = self.rt, self.stream
        capturable = getattr(self.context, "is_stream_capturable", None)  # TensorRT-RTX, newer TensorRT
        if capturable is not None and not capturable(int(stream)):
            return self._graphs_off("TensorRT says this execution context cannot be stream-captured")
        error = int(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)[0])
        if error:
            return self._graphs_off(f"cudaStreamBeginCapture failed ({error})")
        captured = False
        try:
            captured = self.context.execute_async_v3(stream_handle=int(stream))
        finally:  # even if the enqueue raised: the stream must leave capture mode, or every later step fails
            error, graph = rt.cudaStreamEndCapture(stream)  # 901: CUDA invalidated the capture
            if int(error) or not captured:
                rt.cudaGetLastError()  # a failed capture may leave its error as the thread's last one
                if not int(error):  # captured, but the enqueue failed or raised: the graph is incomplete
                    rt.cudaGraphDestroy(graph)
        if int(error) or not captured:
            return self._graphs_off(f"cudaStreamEndCapture failed ({int(error)})" if int(error) else
                                    "the engine has work that cannot be captured")
        error, graph_exec = rt.cudaGraphInstantiate(graph, 0)
        check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")  # the executable does not need it
        if int(error):
            return self._graphs_off(f"cudaGraphInstantiate failed ({int(error)})")
        self.graph = graph_exec

    def _graphs_off(self, reason: str) -> None:
        self.cuda_graphs = False
        log.warning(f"CUDA graphs off: {reason}; steps continue without them")

    def _drop_graph(self) -> None:
        graph, self.graph = getattr(self, "graph", None), None
        if graph is not None:
            check(self.rt.cudaGraphExecDestroy(graph), "cudaGraphExecDestroy")

    def close(self) -> None:
        """Free this batch's CUDA graph and device buffers (start() makes new ones); the stream stays."""
        buffers = getattr(self, "buffers", {})
        self.buffers, self.bound = {}, None
        self.batch = 0  # no buffers: step() refuses until start() succeeds
        try:  # the graph first: it holds the buffers' addresses. Release everything, then report a failure.
            self._drop_graph()
        finally:
            for buffer in buffers.values():
                buffer.free()

    def __del__(self):
        try:
            self.close()
            if getattr(self, "stream", None) is not None:
                self.rt.cudaStreamDestroy(self.stream)
        except Exception:
            pass
