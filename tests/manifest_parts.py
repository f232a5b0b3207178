"""Complete, valid manifest sections for tests that need an engine section without building an engine."""

import dataclasses

from persimmon_runtime.manifest import EngineSection, Profile

ENGINE = EngineSection(
    flavor="tensorrt", version="10.15.1.29", engine_file="engine.plan", onnx_file="model.onnx",
    compute_capabilities=["9.0"], version_compatible=False, cache_update="tensor_scatter", plugin_ptx=None,
    max_prefill=4, profiles=[Profile("prefill", {}), Profile("decode", {})],
    polygraphy="polygraphy convert model.onnx --convert-to trt -o engine.plan",
    trtexec="trtexec --onnx=model.onnx --saveEngine=engine.plan")


def engine_section(**changes) -> EngineSection:
    """A TensorRT engine section with `changes` applied."""
    return dataclasses.replace(ENGINE, **changes)


def engine_dict(**changes) -> dict:
    """The same as it appears in manifest.json."""
    return dataclasses.asdict(engine_section(**changes))
