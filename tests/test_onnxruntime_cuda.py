"""onnxruntime's CUDA execution provider (onnxruntime-gpu, on a GPU machine) runs a build to the
same logits as the CPU provider: prefill, then decode steps through the bound caches."""

import numpy as np
import pytest

from persimmon_export.build import build
from persimmon_export.demo import make_demo_checkpoint
from persimmon_export.options import BuildOptions
from persimmon_runtime.generator import Generator

BOUNDS = {"float32": 1e-3, "float16": 3e-2}  # max |cuda - cpu| relative to the largest CPU logit


def _cuda_provider():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu in place of "
                    f"onnxruntime): {ort.get_available_providers()}")


def _logits(backend, prompt, decode_steps):
    backend.start(1)
    ids = np.asarray([prompt], np.int64)
    count = len(prompt)
    out = [backend.step(ids, np.zeros(1, np.int64), np.full(1, count, np.int64), np.ones((1, count), np.int64))]
    for _ in range(decode_steps):
        token = np.asarray([[int(out[-1].argmax())]], np.int64)
        out.append(backend.step(token, np.full(1, count, np.int64), np.ones(1, np.int64),
                                np.ones((1, count + 1), np.int64)))
        count += 1
    return np.stack(out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(BOUNDS))
def test_cuda_provider_matches_cpu(tmp_path, dtype):
    _cuda_provider()
    checkpoint = make_demo_checkpoint(str(tmp_path / "ckpt"), seed=11, max_position_embeddings=64, hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    out = str(tmp_path / "build")
    build(checkpoint, out, BuildOptions(dtype=dtype, backend="onnxruntime", max_batch=1, kv_capacity=64))
    on_gpu = Generator.load(out, backend="onnxruntime", device="cuda").backend
    # onnxruntime falls back to CPU, with only a log line, when the CUDA libraries do not load
    assert on_gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    cpu = Generator.load(out, backend="onnxruntime", device="cpu").backend
    prompt = [3, 17, 29, 5, 8, 41, 2]
    expected, got = _logits(cpu, prompt, 6), _logits(on_gpu, prompt, 6)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= BOUNDS[dtype] * max(1.0, np.abs(expected).max())
