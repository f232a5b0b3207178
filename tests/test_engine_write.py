"""Writing the engine: streamed to its file by the builder, with a full disk reported as such."""

import os

import pytest

from persimmon_export.build import build
from persimmon_export.demo import make_demo_checkpoint
from persimmon_export.engine.tensorrt import ENGINE_FILE, TENSORRT_RTX, EngineError, EngineOptions, build_engine
from persimmon_export.options import BuildOptions
from persimmon_runtime.manifest import Manifest

RTX_VERSION, RTX_MISSING = TENSORRT_RTX.installed()


@pytest.mark.skipif(RTX_VERSION is None, reason=f"TensorRT-RTX is not installed: {RTX_MISSING}")
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_while_the_engine_streams_out_is_one_clear_error(tmp_path):
    checkpoint = make_demo_checkpoint(str(tmp_path / "ckpt"), seed=3)
    out = str(tmp_path / "build")
    build(checkpoint, out, BuildOptions(max_batch=2, kv_capacity=32, backend="onnxruntime", cache_layout="window"))
    os.symlink("/dev/full", os.path.join(out, ENGINE_FILE))  # every write fails with ENOSPC
    with pytest.raises(EngineError) as raised:
        build_engine(out, Manifest.load(out), TENSORRT_RTX, EngineOptions(max_prefill=8, compute_capabilities=["8.9"]),
                     shown_as="/builds/p8b")
    message = str(raised.value)
    assert message == (f"/builds/p8b/{ENGINE_FILE}: cannot write the engine (No space left on device); free some "
                       f"space or choose another --out")
