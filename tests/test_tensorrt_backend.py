"""The TensorRT backend's CUDA layer: graphs (one at a time, dropped at every rebinding, and a
capture that fails turns them off instead of failing the step), checked TensorRT setters, the
streamed engine file and TensorRT-RTX's own graphs.

Without a GPU the CUDA runtime is a recorder that hands out handles, returns cuda-python's
(error, value) tuples and refuses to destroy a handle twice or one it never made; on a GPU the
same calls run through cuda-python for real (tests marked gpu).
"""

import os
import re
import types

import numpy as np
import pytest
from manifest_parts import engine_dict

from persimmon_runtime.backends.tensorrt import TensorRTBackend, create_context, engine_reader
from persimmon_runtime.errors import PersimmonError

INVALIDATED = 901  # cudaErrorStreamCaptureInvalidated


class RecordingRuntime:
    """The graph calls of cuda-python's runtime module, (error, value) tuples included."""

    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self):
        self.live, self.count, self.fail_destroy = set(), 0, False
        self.end_capture_error, self.instantiate_error = 0, 0
        self.calls, self.capturing = [], False

    def _new(self, kind):
        self.count += 1
        self.live.add((kind, self.count))
        return 0, self.count

    def _destroy(self, kind, handle):
        self.live.remove((kind, handle))  # KeyError: destroyed twice, or never made
        return (1 if self.fail_destroy else 0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.calls.append("begin")
        self.capturing = True
        return (0,)

    def cudaStreamEndCapture(self, stream):
        self.capturing = False
        if self.end_capture_error:  # CUDA gives no graph with the error
            return self.end_capture_error, None
        return self._new("graph")

    def cudaGetLastError(self):
        return (0,)

    def cudaGraphInstantiate(self, graph, flags):
        assert ("graph", graph) in self.live
        return (self.instantiate_error, None) if self.instantiate_error else self._new("exec")

    def cudaGraphLaunch(self, graph_exec, stream):
        assert ("exec", graph_exec) in self.live
        self.calls.append("launch")
        return (0,)

    def cudaGraphDestroy(self, graph):
        return self._destroy("graph", graph)

    def cudaGraphExecDestroy(self, graph_exec):
        return self._destroy("exec", graph_exec)


def _backend(rt, stream, captures=True, enqueue=lambda stream: None, capturable=None):
    """The backend's graph state without __init__ (which loads an engine on a GPU); _bind records.
    captures=False: the engine runs, but not under stream capture."""
    backend = TensorRTBackend.__new__(TensorRTBackend)
    backend.rt, backend.stream, backend.cuda_graphs, backend.buffers = rt, stream, True, {}
    backend.graph, backend.bound, backend.in_place = None, None, True

    def execute_async_v3(stream_handle):
        rt.calls.append("execute")
        enqueue(stream_handle)
        return captures or not getattr(rt, "capturing", False)

    backend.context = types.SimpleNamespace(execute_async_v3=execute_async_v3)
    if capturable is not None:
        backend.context.is_stream_capturable = lambda stream_handle: capturable
    backend._bind = lambda profile, inputs, first_row: rt.calls.append("bind")
    return backend


DECODE, PREFILL = 1, 0  # profile indices


def test_one_graph_at_a_time_replayed_only_while_the_binding_is_unchanged():
    rt = RecordingRuntime()
    backend = _backend(rt, stream=7)
    steps = [((DECODE, 1, 1, 64, 0), True), ((DECODE, 1, 1, 64, 0), True), ((PREFILL, 1, 5, 69, 0), False),
             ((DECODE, 1, 1, 128, 0), True), ((DECODE, 1, 1, 128, 0), True), ((DECODE, 2, 1, 128, 0), True)]
    for binding, decoding in steps:
        backend._enqueue(binding, {}, decoding)
        assert len([kind for kind, _ in rt.live if kind == "exec"]) <= 1  # bounded: never more than one graph
    assert rt.calls == ["bind", "execute", "begin", "execute",   # decode: eager, then captured
                        "launch",                                 # same binding: replayed
                        "bind", "execute",                        # prefill: the graph dropped, none captured
                        "bind", "execute", "begin", "execute", "launch",  # next width bucket: a new graph
                        "bind", "execute", "begin", "execute"]    # other rows: another
    backend.close()
    assert rt.live == set() and backend.graph is None and backend.bound is None
    backend.close()  # nothing left to destroy: no second destroy either


def test_a_capture_that_cuda_invalidates_turns_graphs_off_and_steps_go_on(caplog):
    """The bug: check() raised on cudaStreamEndCapture's 901 before the fallback, and every new
    decode shape raised again."""
    rt = RecordingRuntime()
    rt.end_capture_error = INVALIDATED
    backend = _backend(rt, stream=7)
    backend._enqueue((DECODE, 1, 1, 64, 0), {}, True)
    assert backend.cuda_graphs is False and backend.graph is None and rt.live == set()
    assert "CUDA graphs off: cudaStreamEndCapture failed (901); steps continue without them" in caplog.text
    rt.calls.clear()
    for width in (64, 128):
        backend._enqueue((DECODE, 1, 1, width, 0), {}, True)
    assert rt.calls == ["execute", "bind", "execute"]  # eager, no capture tried again


@pytest.mark.parametrize("failure", ["engine", "instantiate", "not capturable"])
def test_every_other_capture_failure_also_falls_back_and_leaves_nothing(failure):
    rt = RecordingRuntime()
    rt.instantiate_error = 1 if failure == "instantiate" else 0
    backend = _backend(rt, stream=7, captures=failure != "engine",
                       capturable=False if failure == "not capturable" else None)
    backend._enqueue((DECODE, 1, 1, 64, 0), {}, True)
    assert backend.cuda_graphs is False and backend.graph is None and rt.live == set()
    assert ("begin" in rt.calls) is (failure != "not capturable")


def test_close_releases_everything_before_reporting_a_failed_destroy():
    rt = RecordingRuntime()
    backend = _backend(rt, stream=7)
    freed = []
    backend.buffers = {"logits": types.SimpleNamespace(free=lambda: freed.append("logits"))}
    backend._enqueue((DECODE, 1, 1, 64, 0), {}, True)
    rt.fail_destroy = True
    with pytest.raises(PersimmonError, match=r"cudaGraphExecDestroy failed"):
        backend.close()
    assert rt.live == set() and backend.graph is None and backend.batch == 0 and freed == ["logits"]


def test_a_setter_tensorrt_refuses_is_an_error_not_a_later_crash():
    """set_input_shape, set_tensor_address and set_optimization_profile_async return False (and
    log why) instead of raising; the step used to go on with the old shape or address."""
    backend = TensorRTBackend.__new__(TensorRTBackend)
    backend.profile, backend.stream, backend.row_bytes = None, 7, 64
    backend.buffers = {name: types.SimpleNamespace(ptr=4096) for name in ("input_ids", "logits", "past_key_0")}
    backend.manifest = types.SimpleNamespace(cache_aliases={"present_key_0": "past_key_0"}, cache_shape=(2, 8, 4))
    backend.in_place = True
    refused = {"set_input_shape": "input_ids"}
    backend.context = types.SimpleNamespace(
        set_optimization_profile_async=lambda profile, stream: True,
        set_input_shape=lambda name, shape: refused.get("set_input_shape") != name,
        set_tensor_address=lambda name, address: True)
    with pytest.raises(PersimmonError, match=r"TensorRT refused set_input_shape\(input_ids, \(1, 1\)\)"):
        backend._bind(DECODE, {"input_ids": np.zeros((1, 1), np.int64)}, 0)
    backend.context.set_optimization_profile_async = lambda profile, stream: False
    with pytest.raises(PersimmonError, match=r"TensorRT refused set_optimization_profile_async\(0\)"):
        backend._bind(PREFILL, {}, 0)
    assert backend.profile is None  # a refused switch is not recorded as made


# ---- TensorRT-RTX: its own CUDA graphs, the streamed engine file ----

@pytest.fixture
def rtx():
    return pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (examples/setup.sh installs it)")


def test_rtx_engines_get_rtxs_own_whole_graph_capture_and_plain_tensorrt_ours(rtx):
    class Engine:
        def create_runtime_config(self):
            return types.SimpleNamespace(cuda_graph_strategy=rtx.CudaGraphStrategy.DISABLED)

        def create_execution_context(self, config=None):
            return ("context", config)

    (context, config), native = create_context(rtx, Engine(), "b/engine.plan")  # the real module's enum
    assert native and config.cuda_graph_strategy == rtx.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
    plain_tensorrt = types.SimpleNamespace()  # no CudaGraphStrategy: NVIDIA TensorRT 10.x / 11.x
    assert create_context(plain_tensorrt, Engine(), "b/engine.plan") == (("context", None), False)


def test_a_context_tensorrt_cannot_create_is_one_line():
    """create_execution_context returns None on out-of-memory; it surfaced later as an AttributeError."""
    engine = types.SimpleNamespace(create_execution_context=lambda *config: None)
    with pytest.raises(PersimmonError, match=r"^b/engine.plan: TensorRT could not create an execution context"):
        create_context(types.SimpleNamespace(), engine, "b/engine.plan")


def _read_through(trt, path):
    with open(path, "rb") as f:
        reader = engine_reader(trt, f)
        assert isinstance(reader, trt.IStreamReaderV2)
        chunks = [reader.read(4096, 0)]
        assert reader.seek(-6, trt.SeekPosition.END)
        chunks.append(reader.read(100, 0))
        assert reader.seek(10, trt.SeekPosition.SET) and reader.seek(5, trt.SeekPosition.CUR)
        chunks.append(reader.read(2, 0))
        assert not reader.seek(-1, trt.SeekPosition.SET)  # refused, as a reader reports it: False
        return chunks


@pytest.fixture
def engine_file(tmp_path, monkeypatch):
    import persimmon_runtime.backends.tensorrt as backend_module

    monkeypatch.setattr(backend_module, "READ_CHUNK", 1000)
    path = tmp_path / "engine.plan"
    path.write_bytes(bytes(range(256)) * 10)
    return path


def test_the_engine_file_is_handed_over_in_chunks(engine_file, rtx):
    """Against the bindings' names (the real SeekPosition); the base class is a stand-in, since
    constructing the real one needs a CUDA driver (the gpu test below does)."""
    trt = types.SimpleNamespace(IStreamReaderV2=type("IStreamReaderV2", (), {"__init__": lambda self: None}),
                                SeekPosition=rtx.SeekPosition)
    data = engine_file.read_bytes()
    assert _read_through(trt, engine_file) == [data[:1000], data[-6:], bytes([15, 16])]  # READ_CHUNK at most


# Not marked `gpu`: it needs TensorRT-RTX and a CUDA driver together, which the lent H100/H200
# machines (no TensorRT-RTX) do not have; it runs wherever both are.
def test_the_engine_file_reader_on_the_real_bindings(engine_file, rtx):
    try:
        chunks = _read_through(rtx, engine_file)
    except RuntimeError as e:  # "Failed to open cuda driver": no driver here
        pytest.skip(f"TensorRT-RTX's stream reader needs a CUDA driver ({e})")
    data = engine_file.read_bytes()
    assert chunks == [data[:1000], data[-6:], bytes([15, 16])]


def test_rtx_builds_require_user_allocation_for_stream_capture(rtx):
    """TensorRT-RTX's release notes: BuilderFlag.REQUIRE_USER_ALLOCATION is required for CUDA
    stream capture (set on the real builder config here; the build itself needs no GPU)."""
    from persimmon_export.engine.tensorrt import TENSORRT_RTX, builder_config

    builder = rtx.Builder(rtx.Logger(rtx.Logger.ERROR))
    config, _ = builder_config(rtx, TENSORRT_RTX, builder, [], ["8.6"])
    assert config.get_flag(rtx.BuilderFlag.REQUIRE_USER_ALLOCATION)


# ---- on a GPU: the same calls through cuda-python ----

def _cuda_runtime():
    try:
        from persimmon_runtime.backends.cuda import check, cudart
        rt = cudart()
        if check(rt.cudaGetDeviceCount()) < 1:
            raise RuntimeError("no device")
        return rt, check
    except Exception as e:  # no cuda-python, no driver, or no device
        pytest.skip(f"no CUDA device through cuda-python ({e.__class__.__name__}: {e})")


def _on_gpu(enqueue_with):
    """A backend whose 'engine' is `enqueue_with(rt, check, target, stream)`, on a real stream."""
    rt, check = _cuda_runtime()
    stream = check(rt.cudaStreamCreate())
    target = check(rt.cudaMalloc(256))
    backend = _backend(rt, stream, enqueue=lambda s: enqueue_with(rt, check, target, s))
    backend.rt.calls = []
    return rt, check, stream, target, backend


def _read(rt, check, target, stream) -> np.ndarray:
    host = np.zeros(256, np.uint8)
    check(rt.cudaMemcpyAsync(host.ctypes.data, target, 256, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
    check(rt.cudaStreamSynchronize(stream))
    return host


@pytest.mark.gpu
def test_graphs_are_made_replayed_and_destroyed_through_cuda_python():
    """Capture a memset as the 'engine', replay it, close; check() raises on any CUDA error."""
    rt, check, stream, target, backend = _on_gpu(
        lambda rt, check, target, s: check(rt.cudaMemsetAsync(target, 7, 256, s)))
    try:
        backend._enqueue((DECODE, 1, 1, 64, 0), {}, True)
        assert backend.graph is not None
        check(rt.cudaMemsetAsync(target, 0, 256, stream))
        backend._enqueue((DECODE, 1, 1, 64, 0), {}, True)  # replayed
        assert (_read(rt, check, target, stream) == 7).all()
        backend.close()
        assert backend.graph is None
    finally:
        check(rt.cudaFree(target))
        check(rt.cudaStreamDestroy(stream))


@pytest.mark.gpu
def test_a_capture_real_cuda_invalidates_falls_back():
    """A synchronous copy inside a thread-local capture makes CUDA invalidate it (901 at
    cudaStreamEndCapture): the step's result stands and later steps run eagerly."""
    def enqueue(rt, check, target, s):
        rt.cudaMemsetAsync(target, 9, 256, s)
        host = np.zeros(1, np.uint8)
        rt.cudaMemcpy(host.ctypes.data, target, 1, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)  # not capturable

    rt, check, stream, target, backend = _on_gpu(enqueue)
    try:
        backend._enqueue((DECODE, 1, 1, 64, 0), {}, True)
        assert backend.cuda_graphs is False and backend.graph is None
        check(rt.cudaStreamSynchronize(stream))  # the stream works after the failed capture
        backend._enqueue((DECODE, 1, 1, 128, 0), {}, True)
        assert (_read(rt, check, target, stream) == 9).all()
        backend.close()
    finally:
        check(rt.cudaFree(target))
        check(rt.cudaStreamDestroy(stream))


# ---- the plugins' PTX against the driver ----

from persimmon_runtime.backends.tensorrt import check_driver_runs_plugin_ptx  # noqa: E402
from persimmon_runtime.manifest import PluginPtx  # noqa: E402


@pytest.mark.parametrize("driver", [13000, 13010, 14000])
def test_a_driver_as_new_as_the_ptx_runs_it(driver):
    check_driver_runs_plugin_ptx(PluginPtx("9.0", "13.0"), driver)


@pytest.mark.parametrize("driver, shown", [(12090, "12.9"), (12040, "12.4"), (11080, "11.8")])
def test_an_older_driver_is_refused_with_what_to_do(driver, shown):
    with pytest.raises(PersimmonError) as error:
        check_driver_runs_plugin_ptx(PluginPtx("9.0", "13.0"), driver)
    message = str(error.value)
    assert f"PTX ISA 9.0, which needs an NVIDIA driver for CUDA 13.0 or newer; this machine's driver supports " \
           f"CUDA {shown}: update the driver, or rebuild with an nvcc from CUDA {shown} or older, or with " \
           f"--plugins off" in message and "\n" not in message


def test_minor_versions_count_for_ptx():
    """PTX JIT has no minor-version compatibility: a CUDA 12.4 driver cannot run 12.8's PTX."""
    ptx = PluginPtx("8.7", "12.8")
    with pytest.raises(PersimmonError, match="supports CUDA 12.4"):
        check_driver_runs_plugin_ptx(ptx, 12040)
    check_driver_runs_plugin_ptx(ptx, 12080)


def test_engines_without_plugin_ptx_need_no_particular_driver():
    check_driver_runs_plugin_ptx(None, 11000)


@pytest.fixture(scope="module")
def raw_manifest(tmp_path_factory):
    """A real build's manifest.json, parsed."""
    import json

    from persimmon_export.build import build
    from persimmon_export.demo import make_demo_checkpoint
    from persimmon_export.options import BuildOptions

    root = tmp_path_factory.mktemp("ptx-manifest")
    checkpoint = make_demo_checkpoint(str(root / "ckpt"), seed=3, max_position_embeddings=32, hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    build(checkpoint, str(root / "build"), BuildOptions(dtype="float32", backend="onnxruntime", max_batch=1,
                                                        kv_capacity=32))
    with open(root / "build" / "manifest.json") as f:
        return json.load(f)


def _with_plugin_ptx(raw, value):
    raw = dict(raw, files=dict(raw["files"], **{"engine.plan": {"bytes": 1, "sha256": "0" * 64}}))
    raw["tensorrt"] = engine_dict(plugin_ptx=None)
    raw["tensorrt"]["plugin_ptx"] = value
    return raw


@pytest.mark.parametrize("value", [None, {"isa": "9.0", "min_driver_cuda": "13.0"},
                                   {"isa": "8.10", "min_driver_cuda": "12.10"}])
def test_the_manifest_accepts_recorded_plugin_ptx(raw_manifest, value):
    from persimmon_runtime.manifest import validate

    validate("manifest.json", _with_plugin_ptx(raw_manifest, value))


@pytest.mark.parametrize("value, field", [
    ("9.0", "tensorrt.plugin_ptx"), ([], "tensorrt.plugin_ptx"), ({"isa": "9.0"}, "tensorrt.plugin_ptx.min_driver_cuda"),
    ({"isa": 9.0, "min_driver_cuda": "13.0"}, "tensorrt.plugin_ptx.isa"),
    ({"isa": "9", "min_driver_cuda": "13.0"}, "tensorrt.plugin_ptx.isa"),
    ({"isa": "9.0", "min_driver_cuda": "13.0.1"}, "tensorrt.plugin_ptx.min_driver_cuda"),
    ({"isa": "9.0", "min_driver_cuda": "13.0\n"}, "tensorrt.plugin_ptx.min_driver_cuda"),
    ({"isa": "٩.٠", "min_driver_cuda": "13.0"}, "tensorrt.plugin_ptx.isa"),  # Unicode digits are not versions
    ({"isa": "9.0", "min_driver_cuda": "13.0", "extra": 1}, "unknown field 'tensorrt.plugin_ptx.extra'"),
])
def test_the_manifest_refuses_bad_plugin_ptx_naming_the_field(raw_manifest, value, field):
    from persimmon_runtime.manifest import ManifestError, validate

    with pytest.raises(ManifestError, match=re.escape(field)) as error:
        validate("manifest.json", _with_plugin_ptx(raw_manifest, value))
    assert "\n" not in str(error.value)


def test_an_exception_inside_the_capture_ends_it_and_leaks_nothing():
    rt = RecordingRuntime()

    def enqueue(stream):
        if rt.capturing:
            raise KeyboardInterrupt  # e.g. Ctrl-C while the engine enqueues under capture

    backend = _backend(rt, stream=7, enqueue=enqueue)
    with pytest.raises(KeyboardInterrupt):
        backend._enqueue((DECODE, 1, 1, 64, 0), {}, True)
    assert rt.capturing is False and rt.live == set() and backend.graph is None
