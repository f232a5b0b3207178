"""The TensorRT backend's CUDA graph bookkeeping: every graph it makes is destroyed.

Without a GPU the CUDA runtime is a recorder that hands out handles and refuses to destroy one
twice or one it never made; on a GPU the same steps run through cuda-python for real.
"""

import types

import numpy as np
import pytest

from persimmon_runtime.backends.tensorrt import TensorRTBackend
from persimmon_runtime.errors import PersimmonError


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
