"""The TensorRT backend's CUDA graph bookkeeping: every graph it makes is destroyed.

Without a GPU the CUDA runtime is a recorder that hands out handles and refuses to destroy one
twice or one it never made; on a GPU the same steps run through cuda-python for real.
"""

import re
import types

import numpy as np
import pytest

from persimmon_runtime.backends.tensorrt import TensorRTBackend
from persimmon_runtime.errors import PersimmonError

from manifest_parts import engine_dict


class RecordingRuntime:
    """The graph calls of cuda-python's runtime module, (error, value) tuples included."""

    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self):
        self.live, self.count, self.fail_destroy = set(), 0, False

    def _new(self, kind):
        self.count += 1
        self.live.add((kind, self.count))
        return 0, self.count

    def _destroy(self, kind, handle):
        self.live.remove((kind, handle))  # KeyError: destroyed twice, or never made
        return (1 if self.fail_destroy else 0,)

    def cudaStreamBeginCapture(self, stream, mode):
        return (0,)

    def cudaStreamEndCapture(self, stream):
        return self._new("graph")

    def cudaGraphInstantiate(self, graph, flags):
        assert ("graph", graph) in self.live
        return self._new("exec")

    def cudaGraphDestroy(self, graph):
        return self._destroy("graph", graph)

    def cudaGraphExecDestroy(self, graph_exec):
        return self._destroy("exec", graph_exec)


def _backend(rt, stream, captures=True, enqueue=lambda stream: None):
    """The backend's graph state without __init__ (which loads an engine on a GPU)."""
    backend = TensorRTBackend.__new__(TensorRTBackend)
    backend.rt, backend.stream, backend.cuda_graphs, backend.graphs, backend.buffers = rt, stream, True, {}, {}

    def execute_async_v3(stream_handle):
        enqueue(stream_handle)
        return captures

    backend.context = types.SimpleNamespace(execute_async_v3=execute_async_v3)
    return backend


def test_close_destroys_every_graph_once_and_capture_keeps_only_executables():
    rt = RecordingRuntime()
    backend = _backend(rt, stream=7)
    for key in [(1, 64), (1, 128), (2, 64)]:
        backend._capture(key)
    assert {kind for kind, _ in rt.live} == {"exec"} and len(rt.live) == 3
    backend.close()
    assert rt.live == set() and backend.graphs == {}
    backend.close()  # nothing left to destroy: no second destroy either


def test_a_capture_that_fails_leaves_nothing_behind():
    rt = RecordingRuntime()
    backend = _backend(rt, stream=7, captures=False)
    backend._capture((1, 64))
    assert rt.live == set() and backend.graphs == {} and backend.cuda_graphs is False


def test_close_releases_everything_before_reporting_a_failed_destroy():
    rt = RecordingRuntime()
    backend = _backend(rt, stream=7)
    backend._capture((1, 64))
    backend._capture((1, 128))
    rt.fail_destroy = True
    with pytest.raises(PersimmonError, match=r"cudaGraphExecDestroy failed \(error 1\) for 2 of 2 CUDA graphs"):
        backend.close()
    assert rt.live == set() and backend.graphs == {} and backend.batch == 0


def _cuda_runtime():
    try:
        from persimmon_runtime.backends.cuda import check, cudart
        rt = cudart()
        if check(rt.cudaGetDeviceCount()) < 1:
            raise RuntimeError("no device")
        return rt, check
    except Exception as e:  # no cuda-python, no driver, or no device
        pytest.skip(f"no CUDA device through cuda-python ({e.__class__.__name__}: {e})")


@pytest.mark.gpu
def test_graphs_are_made_and_destroyed_through_cuda_python():
    """The real calls: capture a memset as the 'engine', replay it, close. check() raises on any error."""
    rt, check = _cuda_runtime()
    stream = check(rt.cudaStreamCreate())
    target = check(rt.cudaMalloc(256))
    backend = _backend(rt, stream, enqueue=lambda s: check(rt.cudaMemsetAsync(target, 7, 256, s)))
    try:
        for key in [(1, 64), (1, 128)]:
            backend._capture(key)
        check(rt.cudaMemsetAsync(target, 0, 256, stream))
        check(rt.cudaGraphLaunch(backend.graphs[(1, 64)], stream))
        host = np.zeros(256, np.uint8)
        check(rt.cudaMemcpyAsync(host.ctypes.data, target, 256, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        check(rt.cudaStreamSynchronize(stream))
        assert (host == 7).all()  # the graph replays the captured work
        backend.close()
        assert backend.graphs == {}
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

    root = tmp_path_factory.mktemp("ptx-manifest")
    checkpoint = make_demo_checkpoint(str(root / "ckpt"), seed=3, max_position_embeddings=32, hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    build(checkpoint, str(root / "build"), dtype="float32", backend="onnxruntime", max_batch=1, kv_capacity=32)
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
