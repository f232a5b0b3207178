"""TensorRT float16 engines from the exported ONNX, through Polygraphy's loaders.

Supported TensorRT: 10.9 - 11.x. What depends on the version:
- networks are strongly typed (the flag on 10.x; the only kind on 11.x): the fp16 ONNX, with its
  explicit fp32 casts, fixes every type, and no precision flag is set;
- the KV cache update: TensorRT >= 10.15 parses `TensorScatter` into its KV-cache-update layer,
  whose output aliases the cache input (in place). Older versions get a documented fallback: the
  nodes are rewritten to `ScatterElements` (`model.trt.onnx`, same weights file), and the runtime
  alternates two buffers per cache tensor instead of updating one in place;
- plugins: the custom ops become Python-defined plugins with ahead-of-time kernels (>= 10.9);
  without them (`--plugins off`, or no nvcc) the parser inlines the ops' function bodies.

Everything here except `build_engine` is plain Python and tested without TensorRT.
"""

from __future__ import annotations

import os
import shlex

import onnx
from onnx import TensorProto, helper

from persimmon_runtime.backends.cuda import compute_capability
from persimmon_runtime.backends.tensorrt import parse_version
from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.manifest import Manifest

MIN_VERSION = (10, 9)
KV_CACHE_UPDATE_LAYER_VERSION = (10, 15)
ENGINE_FILE = "engine.plan"
FALLBACK_ONNX = "model.trt.onnx"
PREFILL, DECODE = 0, 1  # optimization profile indices
# ONNX ops the TensorRT 10.15 parser supports (onnx-tensorrt docs/operators.md) that this graph
# may use, with the first version that has them where it is recent.
OP_SINCE = {"TensorScatter": (10, 15), "Attention": (10, 14), "RotaryEmbedding": (10, 15),
            "RMSNormalization": (10, 15)}
PARSER_OPS = set(OP_SINCE) | {
    "Add", "And", "Cast", "CastLike", "Concat", "Constant", "Cos", "Div", "Equal", "Expand", "Gather",
    "GatherElements", "GatherND", "Gelu", "Greater", "Identity", "LayerNormalization", "Less", "LessOrEqual",
    "MatMul", "Mul", "Neg", "Not", "Range", "Reshape", "Relu", "ScatterElements", "Shape", "Sigmoid", "Sin",
    "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where"}


class EngineError(PersimmonError):
    pass


def check_version(version: tuple[int, ...]) -> None:
    if version[:2] < MIN_VERSION or version[0] > 11:
        raise EngineError(f"TensorRT {'.'.join(map(str, version))} is outside the supported range "
                          f"{MIN_VERSION[0]}.{MIN_VERSION[1]} - 11.x")


def cache_update_path(version: tuple[int, ...]) -> str:
    """'tensor_scatter' (KV-cache-update layer, in place) or 'scatter_elements' (the fallback)."""
    return "tensor_scatter" if version[:2] >= KV_CACHE_UPDATE_LAYER_VERSION else "scatter_elements"


def optimization_profiles(manifest: Manifest, max_prefill: int) -> list[dict[str, tuple]]:
    """Profile 0 serves prefill (up to max_prefill new tokens), profile 1 decode (one token).

    Each maps every input to (min, opt, max) shapes; batch spans 1..max_batch in both.
    """
    batch, capacity = manifest.max_batch, manifest.kv_capacity
    if not 1 <= max_prefill <= capacity:
        raise EngineError(f"--max-prefill must be in [1, max_seq={capacity}], got {max_prefill}")
    cache = manifest.cache_shape
    profiles = []
    for seq, kv_opt in ((max_prefill, max_prefill), (1, max(1, capacity // 2))):
        shapes = {
            "input_ids": ((1, 1), (batch, seq), (batch, seq)),
            "cache_position": ((1,), (batch,), (batch,)),
            "token_count": ((1,), (batch,), (batch,)),
            "attention_mask": ((1, 1), (batch, kv_opt), (batch, capacity)),
        }
        for name in manifest.cache_inputs:
            shapes[name] = ((1, *cache), (batch, *cache), (batch, *cache))
        profiles.append(shapes)
    return profiles


def readiness_problems(model: onnx.ModelProto, version: tuple[int, ...], plugins: bool) -> list[str]:
    """What would stop TensorRT `version` from building this graph (empty when ready).

    Checks every node against the parser's supported ops (custom ops through their function
    bodies unless plugins are used), TensorScatter's restrictions, and that the graph is strongly
    typed as is: every elementwise op sees one input type (no implicit casts to infer).
    """
    problems = []
    functions = {f.name: f for f in model.functions}
    nodes = list(model.graph.node)
    if not plugins:
        nodes += [n for f in functions.values() for n in f.node]
    for node in nodes:
        if node.domain and node.op_type in functions:
            continue
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name}: op {node.domain}.{node.op_type} has no function body or plugin")
        elif node.op_type not in PARSER_OPS:
            problems.append(f"node {node.name}: {node.op_type} is not in the TensorRT ONNX parser's supported set")
        elif version[:2] < OP_SINCE.get(node.op_type, (0, 0)):
            since = ".".join(map(str, OP_SINCE[node.op_type]))
            problems.append(f"node {node.name}: {node.op_type} needs TensorRT >= {since}")
        if node.op_type == "TensorScatter":
            axis = next((a.i for a in node.attribute if a.name == "axis"), -2)
            if axis != -2:
                problems.append(f"node {node.name}: TensorRT's TensorScatter needs axis=-2, got {axis}")
    try:  # strict inference also proves the graph strongly typed: no node sees mismatched types
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except onnx.shape_inference.InferenceError as e:
        problems.append(f"type/shape inference fails: {e}")
        inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in inferred.graph.node:
        if node.op_type in ("Add", "Sub", "Mul", "Div", "MatMul", "Where", "Concat"):
            inputs = node.input[1:] if node.op_type == "Where" else node.input
            seen = {types.get(name) for name in inputs if name}
            if len(seen) > 1:
                names = [TensorProto.DataType.Name(t) for t in seen if t is not None]
                problems.append(f"node {node.name}: {node.op_type} mixes input types {sorted(names)}")
    return problems


def scatter_elements_fallback(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with each TensorScatter(past, update, write_indices) as ScatterElements on axis 2.

    indices[b, h, t, d] = write_indices[b] + t, so the rows land where TensorScatter puts them;
    the output is a new tensor (not an alias of the input).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = []
    for node in model.graph.node:
        if node.op_type != "TensorScatter":
            nodes.append(node)
            continue
        past, update, write = node.input
        p = node.name
        nodes += [
            helper.make_node("Constant", [], [f"{p}_axes"], value_ints=[1, 2, 3]),
            helper.make_node("Constant", [], [f"{p}_t_axes"], value_ints=[0, 1, 3]),
            helper.make_node("Constant", [], [f"{p}_two"], value_ints=[2]),
            helper.make_node("Constant", [], [f"{p}_zero"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])),
            helper.make_node("Constant", [], [f"{p}_one"], value=helper.make_tensor("o", TensorProto.INT64, [], [1])),
            helper.make_node("Shape", [update], [f"{p}_shape"]),
            helper.make_node("Gather", [f"{p}_shape", f"{p}_two"], [f"{p}_seq"], axis=0),
            helper.make_node("Squeeze", [f"{p}_seq"], [f"{p}_seq_scalar"]),
            helper.make_node("Range", [f"{p}_zero", f"{p}_seq_scalar", f"{p}_one"], [f"{p}_steps"]),
            helper.make_node("Unsqueeze", [f"{p}_steps", f"{p}_t_axes"], [f"{p}_steps4"]),   # [1, 1, T, 1]
            helper.make_node("Unsqueeze", [write, f"{p}_axes"], [f"{p}_start4"]),            # [B, 1, 1, 1]
            helper.make_node("Add", [f"{p}_start4", f"{p}_steps4"], [f"{p}_slots"]),         # [B, 1, T, 1]
            helper.make_node("Expand", [f"{p}_slots", f"{p}_shape"], [f"{p}_indices"]),      # like update
            helper.make_node("ScatterElements", [past, f"{p}_indices", update], list(node.output), name=p, axis=2),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _shape_arg(profile: dict, which: int, separator: str) -> str:
    return ",".join(f"{name}:{separator.join(map(str, shapes[which]))}" for name, shapes in profile.items())


def trtexec_command(onnx_file: str, engine_file: str, profiles: list[dict], version: tuple[int, ...],
                    version_compatible: bool, timing_cache: str | None, opt_level: int,
                    workspace_mib: int | None) -> str:
    """The trtexec line that builds the same engine (plugins need the Python registry: see README)."""
    args = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}", "--skipInference"]
    if version[0] < 11:
        args.append("--stronglyTyped")  # always on in TensorRT 11
    for index, profile in enumerate(profiles):
        args += [f"--profile={index}", f"--minShapes={_shape_arg(profile, 0, 'x')}",
                 f"--optShapes={_shape_arg(profile, 1, 'x')}", f"--maxShapes={_shape_arg(profile, 2, 'x')}"]
    args.append(f"--builderOptimizationLevel={opt_level}")
    if version_compatible:
        args.append("--versionCompatible")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    if workspace_mib:
        args.append(f"--memPoolSize=workspace:{workspace_mib}M")
    return shlex.join(args)


def polygraphy_command(onnx_file: str, engine_file: str, profiles: list[dict], version_compatible: bool,
                       timing_cache: str | None, opt_level: int, workspace_mib: int | None) -> str:
    args = ["polygraphy", "convert", onnx_file, "--convert-to", "trt", "-o", engine_file, "--strongly-typed"]
    for profile in profiles:
        for flag, which in (("--trt-min-shapes", 0), ("--trt-opt-shapes", 1), ("--trt-max-shapes", 2)):
            args += [flag] + [f"{name}:[{','.join(map(str, shapes[which]))}]" for name, shapes in profile.items()]
    args += ["--builder-optimization-level", str(opt_level)]
    if version_compatible:
        args.append("--version-compatible")
    if timing_cache:
        args += ["--load-timing-cache", timing_cache, "--save-timing-cache", timing_cache]
    if workspace_mib:
        args += ["--pool-limit", f"workspace:{workspace_mib}M"]
    return shlex.join(args)


def tensorrt_version() -> tuple[tuple[int, ...] | None, str]:
    """(version, '') when TensorRT's builder imports, else (None, why not)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return None, f"tensorrt is not importable ({e}); install TensorRT (pip install tensorrt from NVIDIA's " \
                     f"index, or use an NGC container)"
    if not hasattr(trt, "Builder"):
        return None, f"tensorrt {getattr(trt, '__version__', '?')} has no Builder (a runtime-only or stub package)"
    return parse_version(trt.__version__), ""


def build_engine(directory: str, manifest: Manifest, max_prefill: int, plugins: str = "auto",
                 version_compatible: bool = False, timing_cache: str | None = None, opt_level: int = 3,
                 workspace_mib: int | None = None, progress=print) -> dict:
    """Build `directory`/engine.plan from the exported ONNX; return the manifest's `tensorrt` section."""
    version, why = tensorrt_version()
    if version is None:
        raise EngineError(f"cannot build a TensorRT engine: {why}")
    check_version(version)
    import tensorrt as trt
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile)

    use_plugins = _use_plugins(plugins, progress)
    onnx_path = os.path.join(directory, manifest.onnx["file"])
    path = cache_update_path(version)
    model = onnx.load(onnx_path, load_external_data=False)
    if path == "scatter_elements":
        model = scatter_elements_fallback(model)
        onnx_path = os.path.join(directory, FALLBACK_ONNX)
        onnx.save(model, onnx_path)  # its initializers still point at model.onnx.data
    problems = readiness_problems(model, version, use_plugins)
    if problems:
        raise EngineError(f"{onnx_path}: not buildable with TensorRT {'.'.join(map(str, version))}: "
                          + "; ".join(problems[:5]))
    profiles = optimization_profiles(manifest, max_prefill)
    polygraphy_profiles = []
    for shapes in profiles:
        profile = Profile()
        for name, (low, opt, high) in shapes.items():
            profile.add(name, low, opt, high)
        polygraphy_profiles.append(profile)
    pools = {trt.MemoryPoolType.WORKSPACE: workspace_mib * 2**20} if workspace_mib else None
    progress(f"TensorRT {trt.__version__}: building ({path} cache update, plugins {'on' if use_plugins else 'off'}, "
             f"{len(profiles)} profiles) ...")
    # 10.x needs the strongly-typed flag; 11.x builds nothing else (its flag is only kept for compatibility)
    network = NetworkFromOnnxPath(onnx_path, strongly_typed=True if version[0] < 11 else None)
    config = CreateConfig(profiles=polygraphy_profiles, load_timing_cache=timing_cache,
                          builder_optimization_level=opt_level, memory_pool_limits=pools,
                          version_compatible=version_compatible or None)
    try:
        engine = EngineBytesFromNetwork(network, config=config, save_timing_cache=timing_cache)()
    except Exception as e:  # Polygraphy raises its own PolygraphyException with the parser's node errors
        raise EngineError(f"{onnx_path}: TensorRT build failed: {e}") from None
    with open(os.path.join(directory, ENGINE_FILE), "wb") as f:
        f.write(engine)
    onnx_file = os.path.basename(onnx_path)
    return {
        "version": ".".join(map(str, version)), "engine_file": ENGINE_FILE, "onnx_file": onnx_file,
        "compute_capability": compute_capability(), "version_compatible": version_compatible,
        "cache_update": path, "plugins": use_plugins, "plugin_ptx": _plugin_ptx(use_plugins),
        "max_prefill": max_prefill,
        "profiles": [{name: [list(s) for s in shapes] for name, shapes in p.items()} for p in profiles],
        "trtexec": trtexec_command(onnx_file, ENGINE_FILE, profiles, version, version_compatible, timing_cache,
                                   opt_level, workspace_mib),
        "polygraphy": polygraphy_command(onnx_file, ENGINE_FILE, profiles, version_compatible, timing_cache,
                                         opt_level, workspace_mib),
    }


def _use_plugins(plugins: str, progress) -> bool:
    """Register the AOT plugins when asked (on) or when possible (auto)."""
    if plugins == "off":
        return False
    try:
        from persimmon_plugins.compile import nvcc
        if nvcc() is None:
            raise ImportError("nvcc not found")
        import persimmon_plugins.tensorrt_plugins  # noqa: F401  (registers the plugins)
        _plugin_ptx(True)  # nvcc works and writes a PTX ISA whose minimum driver is known
        return True
    except Exception as e:
        if plugins == "on":
            raise EngineError(f"--plugins on: the plugins cannot be used ({e.__class__.__name__}: {e})") from None
        progress(f"plugins unavailable ({e}); the parser inlines the custom ops' function bodies")
        return False


def _plugin_ptx(use_plugins: bool) -> dict | None:
    """What a driver needs to JIT-compile the plugins' PTX in the engine: {"isa", "min_driver_cuda"}."""
    if not use_plugins:
        return None
    from persimmon_plugins.compile import plugin_ptx_requirements
    return plugin_ptx_requirements()
