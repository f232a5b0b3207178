"""TensorRT engines from the exported ONNX, with NVIDIA TensorRT (10.9 - 11.x) or TensorRT-RTX (1.7 - 1.x).

Both share one Python API (Builder, OnnxParser, optimization profiles, the KV-cache-update layer),
so one code path builds with either; a `Flavor` holds what differs (targets, plugins, lean runtime,
timing caches: docs/tensorrt.md). Networks are strongly typed from the graph's own types; the KV
cache is updated in place where the version parses `TensorScatter` into the KV-cache-update layer,
else through the documented ScatterElements fallback (`scatter_elements_fallback`). `build_engine`
and `parse_onnx` need the flavor's module; the rest is plain Python.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shlex
from dataclasses import dataclass, replace

from persimmon_plugins import KERNELS
from persimmon_runtime.backends.cuda import compute_capability
from persimmon_runtime.backends.tensorrt import parse_version
from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.manifest import (
    CAUSAL_LM,
    CLASSIFIER_INPUTS,
    CLASSIFY_ROLE,
    NO_CACHE,
    PROFILE_ROLES,
    EngineSection,
    Manifest,
    PluginPtx,
    Profile,
)

from ..progress import build_monitor

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.plan"
# the dtypes the plugin kernels exist for (a bfloat16 build inlines the ops' function bodies)
PLUGIN_DTYPES = tuple(next(iter(KERNELS.values()))[1])
FALLBACK_ONNX = "model.trt.onnx"
# What the recorded `polygraphy convert` line cannot say with its own flags (TensorRT-RTX's
# REQUIRE_USER_ALLOCATION), as the postprocess script it loads (--trt-cpps); written beside the engine.
POLYGRAPHY_SCRIPT = "polygraphy_postprocess.py"
_POLYGRAPHY_SCRIPT_TEXT = '''"""Written by persimmon-export build for the manifest's `tensorrt.polygraphy` line: the
builder flag Polygraphy has no option for (CUDA stream capture of TensorRT-RTX engines needs it)."""


def postprocess_config(builder, network, config):
    import tensorrt_rtx as trt

    config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
'''
MAX_REPORTED_ERRORS = 5  # parser errors quoted in the one-line message
PLUGIN_CHOICES = ("auto", "on", "off")  # --plugins: auto uses the plugin kernels where possible
DEFAULT_MAX_PREFILL = 2048  # or the build's capacity if smaller


class EngineError(PersimmonError):
    pass


def dotted_version(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


@dataclass(frozen=True)
class EngineOptions:
    """How an engine is built (the `--backend tensorrt` / `tensorrt-rtx` flags of build)."""
    max_prefill: int | None = None          # most new tokens in one step; None: min(capacity, 2048)
    plugins: str = "auto"                   # PLUGIN_CHOICES: custom ops as plugin kernels or function bodies
    compute_capabilities: tuple[str, ...] | None = None  # TensorRT-RTX's target GPUs; None: its defaults
    version_compatible: bool = False        # TensorRT: embed the lean runtime
    timing_cache: str | None = None         # TensorRT: a timing cache file, read and updated
    opt_level: int = 3                      # builder optimization level, 0..5
    workspace_mib: int | None = None        # builder workspace pool limit

    def __post_init__(self):
        if self.plugins not in PLUGIN_CHOICES:
            raise EngineError(f"--plugins {self.plugins!r} is not one of {PLUGIN_CHOICES}")
        if not 0 <= self.opt_level <= 5:
            raise EngineError(f"--opt-level must be in 0..5, got {self.opt_level}")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise EngineError(f"the workspace limit must be at least 1 MiB, got {self.workspace_mib}")
        if self.compute_capabilities is not None:  # a caller's list, kept as a tuple (frozen)
            object.__setattr__(self, "compute_capabilities", tuple(self.compute_capabilities))

    def for_capacity(self, capacity: int) -> EngineOptions:
        """These options with max_prefill filled in and checked against the build's capacity."""
        max_prefill = self.max_prefill or min(capacity, DEFAULT_MAX_PREFILL)
        _check_max_prefill(max_prefill, capacity)
        return replace(self, max_prefill=max_prefill)


def _check_max_prefill(max_prefill: int, capacity: int) -> None:
    if not 1 <= max_prefill <= capacity:
        raise EngineError(f"--max-prefill must be in [1, kv_capacity={capacity}], got {max_prefill}")


@dataclass(frozen=True)
class Flavor:
    """One TensorRT product: what `--backend` names it, its module, and where it differs."""

    backend: str                      # --backend value and manifest `tensorrt.flavor`
    product: str                      # name in messages
    module: str                       # Python module
    min_version: tuple[int, int]
    max_major: int
    in_place_since: tuple[int, int]   # first version parsing TensorScatter into the KV-cache-update layer
    targets_compute_capabilities: bool  # True: builds for listed GPUs (RTX); False: for the builder's GPU
    aot_plugins: bool                 # has tensorrt.plugin (Python-defined plugins with AOT kernels)
    lean_runtime: bool                # can build version-compatible engines
    timing_cache: bool                # a timing cache helps (RTX: it forces a GPU and changes nothing)
    # CUDA stream capture of its engines needs BuilderFlag.REQUIRE_USER_ALLOCATION (TensorRT-RTX
    # >= 1.2's release notes); NVIDIA TensorRT has no such flag
    capture_needs_user_allocation: bool
    install: str

    def check_version(self, version: tuple[int, ...]) -> None:
        if version[:2] < self.min_version or version[0] > self.max_major:
            raise EngineError(f"{self.product} {dotted_version(version)} is outside the supported range "
                              f"{dotted_version(self.min_version)} - {self.max_major}.x")

    def cache_update_path(self, version: tuple[int, ...]) -> str:
        """'tensor_scatter' (KV-cache-update layer, in place) or 'scatter_elements' (the fallback)."""
        return "tensor_scatter" if version[:2] >= self.in_place_since else "scatter_elements"

    def installed(self) -> tuple[tuple[int, ...] | None, str]:
        """(version, '') when this product's builder imports, else (None, why not)."""
        try:
            trt = importlib.import_module(self.module)
        except ImportError as e:
            return None, f"{self.module} is not importable ({e}); {self.install}"
        if not hasattr(trt, "Builder"):
            return None, (f"{self.module} {getattr(trt, '__version__', '?')} has no Builder (a runtime-only or "
                          f"stub package); {self.install}")
        return parse_version(trt.__version__), ""


TENSORRT = Flavor(
    backend="tensorrt", product="TensorRT", module="tensorrt", min_version=(10, 9), max_major=11,
    in_place_since=(10, 15), targets_compute_capabilities=False, aot_plugins=True,
    lean_runtime=True, timing_cache=True, capture_needs_user_allocation=False,
    install="install TensorRT (pip install tensorrt from NVIDIA's index, or use an NGC container)")
TENSORRT_RTX = Flavor(
    backend="tensorrt-rtx", product="TensorRT-RTX", module="tensorrt_rtx", min_version=(1, 7), max_major=1,
    in_place_since=(1, 7), targets_compute_capabilities=True, aot_plugins=False,
    lean_runtime=False, timing_cache=False, capture_needs_user_allocation=True,
    install="pip install tensorrt-rtx-cu12 (Linux x86_64 and Windows; no GPU needed to build)")
FLAVORS = {flavor.backend: flavor for flavor in (TENSORRT, TENSORRT_RTX)}

# Targets refused, with why. 7.5 (Turing), tried here with TensorRT-RTX 1.7.1 on a CPU-only
# build: the fp16 graph crashes the builder (segmentation fault); the fp32 one fails ("FP32 GEMM
# is not supported" on Turing).
UNBUILDABLE_TARGETS = {"7.5": "TensorRT-RTX 1.7.1 cannot build this model for Turing (7.5): its builder crashes "
                              "(segmentation fault) on the fp16 graph and has no fp32 matrix multiply for Turing"}


def rtx_targets(trt) -> list[str]:
    """The compute capabilities this TensorRT-RTX can target, as 'major.minor' ('8.6', '12.0')."""
    targets = []
    for name in trt.ComputeCapability.__members__:
        digits = re.fullmatch(r"SM(\d)(\d)|SM(\d\d)(\d)", name)
        if digits:
            major, minor = [int(d) for d in digits.groups() if d is not None]
            targets.append(f"{major}.{minor}")
    return targets


def choose_targets(flavor: Flavor, trt, requested: list[str] | None) -> list[str]:
    """The compute capabilities the engine is built for.

    TensorRT builds for its own GPU (recorded, 'unknown' without one) and takes no list.
    TensorRT-RTX builds for `requested`, by default every target it offers that builds here.
    """
    if not flavor.targets_compute_capabilities:
        if requested:
            raise EngineError(f"--compute-capabilities is for --backend tensorrt-rtx; {flavor.product} builds for "
                              f"the GPU it runs on")
        return [compute_capability()]
    buildable = [target for target in rtx_targets(trt) if target not in UNBUILDABLE_TARGETS]
    if not requested:
        return buildable
    for target in requested:
        if target in UNBUILDABLE_TARGETS:
            raise EngineError(f"--compute-capabilities {target}: {UNBUILDABLE_TARGETS[target]}")
        if target not in buildable:
            raise EngineError(f"--compute-capabilities {target!r}: {flavor.product} {trt.__version__} builds for "
                              f"{', '.join(buildable)}")
    return list(dict.fromkeys(requested))  # order kept, duplicates dropped


def optimization_profiles(manifest: Manifest, max_prefill: int) -> list[dict[str, tuple]]:
    """One profile per PROFILE_ROLES entry, in that order: prefill (up to max_prefill new tokens
    per row), then decode (one new token per row).

    Each maps every input to (min, opt, max) shapes; batch spans 1..max_batch in both, and 1..2
    for max_batch 1: TensorRT-RTX 1.7's CPU-only builder crashes the process (SIGSEGV) on profiles
    whose batch is fixed at 1 (tests/test_engine.py); the runtime never runs more than max_batch.
    A classifier has one profile (CLASSIFY_ROLE): texts of 1..kv_capacity tokens, opt max_prefill.
    """
    batch, capacity = max(manifest.max_batch, 2), manifest.kv_capacity
    _check_max_prefill(max_prefill, capacity)
    if manifest.task != CAUSAL_LM:
        return [{name: ((1, 1), (batch, max_prefill), (batch, capacity)) for name in CLASSIFIER_INPUTS}]
    cache = manifest.cache_shape
    new_tokens = {"prefill": (max_prefill, max_prefill), "decode": (1, max(1, capacity // 2))}  # (seq, kv opt)
    profiles = []
    for role in PROFILE_ROLES:
        seq, kv_opt = new_tokens[role]
        shapes = {
            "input_ids": ((1, 1), (batch, seq), (batch, seq)),
            "first_slot": ((1,), (batch,), (batch,)),
            "token_count": ((1,), (batch,), (batch,)),
            "attention_mask": ((1, 1), (batch, kv_opt), (batch, capacity)),
        }
        for name in manifest.cache_inputs:
            shapes[name] = ((1, *cache), (batch, *cache), (batch, *cache))
        profiles.append(shapes)
    return profiles


def scatter_elements_fallback(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """A copy with each TensorScatter(past, update, write_indices) as ScatterElements on axis 2,
    at the lower opset that then suffices (TensorRT before 10.15 may not read opset 24).

    indices[b, h, t, d] = write_indices[b] + t, so the rows land where TensorScatter puts them;
    the output is a new tensor (not an alias of the input).
    """
    import onnx  # here: doctor imports this module on serving hosts, which have no onnx
    from onnx import TensorProto, helper

    from ..graph.onnx_versions import declare_versions

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
    declare_versions(model)
    return model


def _shape_arg(profile: dict, which: int, separator: str) -> str:
    return ",".join(f"{name}:{separator.join(map(str, shapes[which]))}" for name, shapes in profile.items())


def trtexec_command(onnx_file: str, engine_file: str, profiles: list[dict], version: tuple[int, ...],
                    version_compatible: bool, timing_cache: str | None, opt_level: int,
                    workspace_mib: int | None) -> str:
    """The trtexec line that builds the same engine with NVIDIA TensorRT (plugins need the Python
    registry: see README)."""
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
                       timing_cache: str | None, opt_level: int, workspace_mib: int | None,
                       flavor: Flavor = TENSORRT, targets: list[str] | None = None) -> str:
    """The `polygraphy convert` line that builds the same engine. For TensorRT-RTX it starts with
    `env POLYGRAPHY_USE_TENSORRT_RTX=1`: Polygraphy picks its TensorRT module at import."""
    args = ["env", "POLYGRAPHY_USE_TENSORRT_RTX=1"] if flavor is TENSORRT_RTX else []
    args += ["polygraphy", "convert", onnx_file, "--convert-to", "trt", "-o", engine_file, "--strongly-typed"]
    for profile in profiles:
        for flag, which in (("--trt-min-shapes", 0), ("--trt-opt-shapes", 1), ("--trt-max-shapes", 2)):
            args += [flag] + [f"{name}:[{','.join(map(str, shapes[which]))}]" for name, shapes in profile.items()]
    args += ["--builder-optimization-level", str(opt_level)]
    if flavor.targets_compute_capabilities:
        args += ["--compute-capabilities", *targets]
    if version_compatible:
        args.append("--version-compatible")
    if timing_cache:
        args += ["--load-timing-cache", timing_cache, "--save-timing-cache", timing_cache]
    if workspace_mib:
        args += ["--pool-limit", f"workspace:{workspace_mib}M"]
    if flavor.capture_needs_user_allocation:
        args += ["--trt-config-postprocess-script", POLYGRAPHY_SCRIPT]
    return shlex.join(args)


def _recording_logger(trt):
    """A TensorRT logger that keeps errors (for the one-line message) and drops the rest: the
    parser warns about every inlined function body, which would bury what matters."""
    class RecordingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)

    return RecordingLogger()


@dataclass
class ParsedNetwork:
    """A parsed network with what must outlive it: the parser owns the network's weights."""
    builder: object
    network: object
    parser: object
    logger: object


def _one_line(text: str, directory: str, shown_as: str) -> str:
    """Messages name the build's real place, never the temporary directory it is written in."""
    return " ".join(str(text).replace(directory, shown_as).split())


def _parser_error(error) -> str:
    """'node 7 name (Op): reason', with the ONNX local function it sits in, if any."""
    name, op = error.node_name(), error.node_operator()
    where = f"node {error.node()}" + (f" {name}" if name else "") + (f" ({op})" if op else "")
    functions = [error.local_function_stack()[i] for i in range(error.local_function_stack_size())]
    if functions:
        where += " in function " + " > ".join(functions)
    return f"{where}: {error.desc()}"


def parse_onnx(flavor: Flavor, onnx_path: str, shown_as: str | None = None) -> ParsedNetwork:
    """Parse `onnx_path` into a strongly typed network with `flavor`'s builder.

    A failure is one EngineError quoting each node's parser error (node, op, reason), with paths
    under the ONNX file's directory shown under `shown_as` instead.
    """
    trt = importlib.import_module(flavor.module)
    directory = os.path.dirname(onnx_path)
    shown_as = shown_as or directory
    logger = _recording_logger(trt)
    builder = trt.Builder(logger)
    # 10.x needs the flag; TensorRT 11 and TensorRT-RTX build nothing else (and still accept it)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        more = f" ({len(errors) - MAX_REPORTED_ERRORS} more)" if len(errors) > MAX_REPORTED_ERRORS else ""
        reasons = "; ".join(errors[:MAX_REPORTED_ERRORS]) or "no reason given"
        raise EngineError(_one_line(f"{os.path.join(shown_as, os.path.basename(onnx_path))}: the {flavor.product} "
                                    f"{trt.__version__} ONNX parser rejects it: {reasons}{more}", directory, shown_as))
    return ParsedNetwork(builder, network, parser, logger)


def builder_config(trt, flavor: Flavor, builder, profiles: list[dict], targets: list[str], opt_level: int = 3,
                   workspace_mib: int | None = None, version_compatible: bool = False,
                   timing_cache: bytes | None = None):
    """(IBuilderConfig, profiles as TensorRT holds them): the profiles are read back from
    TensorRT's own objects, so what the manifest records is what the engine was built with."""
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if flavor.capture_needs_user_allocation:
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    if timing_cache is not None:
        config.set_timing_cache(config.create_timing_cache(timing_cache), False)
    if flavor.targets_compute_capabilities:
        config.num_compute_capabilities = len(targets)
        for index, target in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + target.replace(".", "")), index)
    built = []
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        if config.add_optimization_profile(profile) < 0:
            raise EngineError(f"{flavor.product} refused optimization profile {len(built)}: {shapes}")
        built.append({name: [list(shape) for shape in profile.get_shape(name)] for name in shapes})
    return config, built


def build_engine(directory: str, manifest: Manifest, flavor: Flavor, options: EngineOptions = EngineOptions(),
                 shown_as: str | None = None) -> EngineSection:
    """Build `directory`/engine.plan from the exported ONNX; return the manifest's `tensorrt` section.

    Messages name `shown_as` (the build's final place) instead of `directory` (where it is written).
    """
    shown_as = shown_as or directory
    options = options.for_capacity(manifest.kv_capacity)
    version, targets = check_engine_options(flavor, options, manifest.dtype)
    max_prefill, timing_cache, opt_level = options.max_prefill, options.timing_cache, options.opt_level
    workspace_mib, version_compatible = options.workspace_mib, options.version_compatible
    trt = importlib.import_module(flavor.module)
    use_plugins = _use_plugins(flavor, options.plugins, manifest.dtype)
    onnx_path = os.path.join(directory, manifest.onnx.file)
    path = flavor.cache_update_path(version) if manifest.task == CAUSAL_LM else NO_CACHE
    if path == "scatter_elements":
        import onnx

        model = scatter_elements_fallback(onnx.load(onnx_path, load_external_data=False))
        onnx_path = os.path.join(directory, FALLBACK_ONNX)
        onnx.save(model, onnx_path)  # its initializers still point at model.onnx.data
    onnx_file = os.path.basename(onnx_path)
    profiles = optimization_profiles(manifest, max_prefill)
    log.info(f"{flavor.product} {trt.__version__}: building ({path} cache update, plugins "
             f"{'on' if use_plugins else 'off'}, {len(profiles)} profiles, compute capability "
             f"{', '.join(targets) or 'of this GPU'}) ...")
    parsed = parse_onnx(flavor, onnx_path, shown_as)
    cache = _read_timing_cache(timing_cache)
    config, built_profiles = builder_config(trt, flavor, parsed.builder, profiles, targets, opt_level,
                                            workspace_mib, version_compatible, cache)
    monitor = build_monitor(trt, log)  # held here: the builder keeps no reference of its own
    if monitor is not None:
        config.progress_monitor = monitor
    try:
        built = _build_to_file(trt, parsed, config, os.path.join(directory, ENGINE_FILE))
    except OSError as e:
        raise EngineError(f"{os.path.join(shown_as, ENGINE_FILE)}: cannot write the engine ({e.strerror}); free "
                          f"some space or choose another --out") from None
    if not built:
        reasons = "; ".join(parsed.logger.errors[-MAX_REPORTED_ERRORS:]) or "no reason given"
        raise EngineError(_one_line(f"{os.path.join(shown_as, onnx_file)}: the {flavor.product} build failed: "
                                    f"{reasons}", directory, shown_as))
    if timing_cache:
        with open(timing_cache, "wb") as f:
            f.write(memoryview(config.get_timing_cache().serialize()))
    if flavor.capture_needs_user_allocation:
        with open(os.path.join(directory, POLYGRAPHY_SCRIPT), "w") as f:
            f.write(_POLYGRAPHY_SCRIPT_TEXT)
    # TensorRT-RTX's own command-line tool is not part of its pip package: no trtexec line
    trtexec = trtexec_command(onnx_file, ENGINE_FILE, profiles, version, version_compatible, timing_cache,
                              opt_level, workspace_mib) if flavor is TENSORRT else None
    return EngineSection(
        flavor=flavor.backend, version=dotted_version(version), engine_file=ENGINE_FILE, onnx_file=onnx_file,
        compute_capabilities=[t for t in targets if t != "unknown"], version_compatible=version_compatible,
        cache_update=path, plugin_ptx=_plugin_ptx(use_plugins), max_prefill=max_prefill,
        profiles=[Profile(role, shapes) for role, shapes in
                  zip(PROFILE_ROLES if manifest.task == CAUSAL_LM else (CLASSIFY_ROLE,), built_profiles)],
        polygraphy=polygraphy_command(onnx_file, ENGINE_FILE, profiles, version_compatible, timing_cache,
                                      opt_level, workspace_mib, flavor, targets),
        trtexec=trtexec)


def check_engine_options(flavor: Flavor, options: EngineOptions,
                         dtype: str = "float16") -> tuple[tuple[int, ...], list[str]]:
    """Refuse what `flavor` (as installed) cannot do with `options`, before anything is exported;
    return its version and the target compute capabilities."""
    plugins, timing_cache = options.plugins, options.timing_cache
    version, why = flavor.installed()
    if version is None:
        raise EngineError(f"cannot build a {flavor.product} engine: {why}")
    flavor.check_version(version)
    if options.version_compatible and not flavor.lean_runtime:
        raise EngineError(f"--version-compatible: {flavor.product} has no lean runtime to embed; its engines load "
                          f"on the {flavor.product} version that built them")
    if timing_cache and not flavor.timing_cache:
        raise EngineError(f"--timing-cache: {flavor.product} ignores timing caches, and using one makes its build "
                          f"need a GPU; leave it out")
    if timing_cache:  # read (and later written) after the export: refuse a bad one before it
        _check_timing_cache_path(timing_cache)
    if plugins == "on" and not flavor.aot_plugins:
        raise EngineError(f"--plugins on: {flavor.product} has no Python-defined plugins (no tensorrt.plugin); "
                          f"use --plugins off or auto (the custom ops then build from their function bodies)")
    if plugins == "on" and dtype not in PLUGIN_DTYPES:
        raise EngineError(f"--plugins on: the plugin kernels are {' and '.join(PLUGIN_DTYPES)} only, this build is "
                          f"{dtype}; use --plugins off or auto (the custom ops then build from their function bodies)")
    targets = choose_targets(flavor, importlib.import_module(flavor.module), options.compute_capabilities)
    return version, targets


def _build_to_file(trt, parsed: ParsedNetwork, config, path: str) -> bool:
    """Build the engine into `path`; False if the build fails, OSError if writing does.

    The builder streams the engine to the file where it can (TensorRT >= 10.15, TensorRT-RTX):
    a serialized engine holds every weight, and holding it in memory besides the builder's own
    copy of the weights doubles the peak (an 8B-shaped fp16 build needs ~2.1x its weights in
    anonymous memory that way, ~1.1x streamed: benchmarks/export_memory.py).
    """
    class FileWriter(trt.IStreamWriter):
        def __init__(self, file):
            trt.IStreamWriter.__init__(self)
            self.file, self.error = file, None

        def write(self, data) -> int:
            try:
                return self.file.write(data)
            except OSError as e:  # an exception cannot cross the builder: returning 0 stops it
                self.error = self.error or e
                return 0

    with open(path, "wb") as f:
        if not hasattr(parsed.builder, "build_serialized_network_to_stream"):
            engine = parsed.builder.build_serialized_network(parsed.network, config)
            return engine is not None and f.write(memoryview(engine)) > 0
        writer = FileWriter(f)
        built = parsed.builder.build_serialized_network_to_stream(parsed.network, config, writer)
    if writer.error:
        raise writer.error
    return built


def _check_timing_cache_path(path: str) -> None:
    """An existing cache must be a readable regular file; a new one needs a writable directory."""
    if os.path.exists(path):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise EngineError(f"--timing-cache {path}: not a readable regular file; pass a timing cache file or a "
                              f"new path")
    elif not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        raise EngineError(f"--timing-cache {path}: its directory does not exist or is not writable; pass a path "
                          f"where the cache can be written")


def _read_timing_cache(path: str | None) -> bytes | None:
    if not path:
        return None
    if not os.path.exists(path):
        return b""  # a new cache, written after the build
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise EngineError(f"--timing-cache {path}: cannot be read ({e.strerror})") from None


def _use_plugins(flavor: Flavor, plugins: str, dtype: str) -> bool:
    """Register the AOT plugins when asked (on) or when possible (auto)."""
    if plugins == "off":
        return False
    if not flavor.aot_plugins or dtype not in PLUGIN_DTYPES:  # (`on` was refused by check_engine_options)
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
        log.info(f"plugins unavailable ({e}); the parser inlines the custom ops' function bodies")
        return False


def _plugin_ptx(use_plugins: bool) -> PluginPtx | None:
    """What a driver needs to JIT-compile the plugins' PTX in the engine (None: no plugins)."""
    if not use_plugins:
        return None
    from persimmon_plugins.compile import plugin_ptx_requirements
    return PluginPtx(**plugin_ptx_requirements())
