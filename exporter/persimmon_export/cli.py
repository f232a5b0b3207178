"""`persimmon-export`: thin argument parsing over the library; each subcommand is one call."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys

from persimmon_runtime.backends import BACKEND_CHOICES
from persimmon_runtime.console import add_verbosity_flags, configure_logging, print_json, run_command
from persimmon_runtime.cpu import PREFILL_CHOICES
from persimmon_runtime.errors import PersimmonError
from persimmon_runtime.manifest import BUILD_BACKENDS, DTYPES, TASKS

from .deploy.triton import KINDS
from .engine.tensorrt import PLUGIN_CHOICES

# What build, parity, convert and demo import: `pip install .` (a serving host) has none of them.
EXPORT_MODULES = ("torch", "onnx", "safetensors", "ml_dtypes", "tqdm")
EXPORT_EXTRA = "pip install '.[export]' in a persimmon-deploy checkout (or its wheel's [export] extra)"


def _require_export_extra(command: str) -> None:
    missing = [name for name in EXPORT_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise PersimmonError(f"{command} needs {', '.join(missing)}, which this install lacks (a runtime-only "
                             f"`pip install .`): {EXPORT_EXTRA}")


def _convert(args) -> None:
    _require_export_extra("convert")
    from .load.convert import convert_megatron

    if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb * 2**30 >= 1):
        raise PersimmonError(f"--max-shard-gb must be a positive number of GiB (e.g. 2), got {args.max_shard_gb}")
    out = convert_megatron(args.checkpoint, args.out, tokenizer_file=args.tokenizer, dtype=args.dtype,
                           max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
    print(f"done: {out}")


def _build(args) -> None:
    _require_export_extra("build")
    from .build import build, summary, summary_line

    manifest = build(args.checkpoint, args.out, _build_options(args))
    result = summary(manifest, args.out)
    print_json(result) if args.json else print(summary_line(result))


def _build_options(args):
    """BuildOptions (with its EngineOptions) from the flags `_add_build_options` defines."""
    from .engine.tensorrt import EngineOptions
    from .options import BuildOptions

    if args.workspace_gb is not None and not (math.isfinite(args.workspace_gb) and args.workspace_gb * 1024 >= 1):
        raise PersimmonError(f"--workspace-gb must be a positive number of GiB (e.g. 8), got {args.workspace_gb}")
    engine = _given(EngineOptions, args, workspace_mib=None if args.workspace_gb is None else
                    int(args.workspace_gb * 1024))
    return _given(BuildOptions, args, engine=engine)


def _given(options_class, args, **computed):
    """options_class from the flags named as its fields that were given (None: left out)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(options_class) if hasattr(args, f.name)}
    return options_class(**{name: value for name, value in {**given, **computed}.items() if value is not None})


def _parity(args) -> int:
    _require_export_extra("parity")
    from .validate.parity import DEFAULT_PROMPTS, check_parity

    results = check_parity(args.checkpoint, args.build, prompts=args.prompt or DEFAULT_PROMPTS,
                           decode_steps=args.steps, backends=args.backend, device=args.device,
                           max_abs=args.max_abs_diff, min_top1=args.min_top1, emulate=args.emulate)
    failed = [r for r in results if not r.passed]
    if args.json:
        print_json({"passed": not failed, "results": [{**dataclasses.asdict(r), "passed": r.passed} for r in results]})
        return 1 if failed else 0
    for result in results:
        print(result.line())
        if result.note:
            print(result.note)
    print("parity: " + ("FAILED for " + ", ".join(r.backend for r in failed) if failed else "all bounds hold"))
    return 1 if failed else 0


def _triton(args) -> None:
    from .deploy.triton import write_repository

    names = write_repository(args.build, args.out, name=args.name, kind=args.kind, instances=args.instances,
                     backend=args.backend, python_paths=args.python_path, overwrite=args.overwrite,
                     generate_timeout_s=args.generate_timeout, queue_delay_ms=args.max_queue_delay_ms,
                     prefill=args.prefill)
    print(f"wrote model repository {args.out} (model {', '.join(names)}); serve it with tritonserver "
          f"--model-repository {args.out} (in a checkout after setup: bash examples/tritonserver.sh {args.out}; "
          f"docs/triton.md)")


def _doctor(args) -> None:
    from .doctor import report

    findings = report()
    if args.json:
        print_json(dict(findings))
        return
    for item, finding in findings:
        print(f"{item:17s} {finding}")


def _demo(args) -> None:
    _require_export_extra("demo")
    from .demo import run_demo

    run_demo(args.out, prompt=args.prompt, max_new_tokens=args.max_new_tokens, overwrite=args.overwrite)


def _add_out(parser: argparse.ArgumentParser, what: str, ours: str) -> None:
    parser.add_argument("--out", required=True,
                        help=f"{what}: a new or empty directory, outside every input. It appears only once "
                             f"complete; nothing else there is ever touched")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace --out if it holds {ours} that persimmon-export wrote earlier (the old one "
                             f"stays until the new one is complete); any other existing content is always refused")


def _add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true",
                        help=f"print one JSON document on stdout instead of text: {what}")


def _add_convert(commands) -> None:
    convert = commands.add_parser(
        "convert", help="adept-inference (Megatron) checkpoint -> Hugging Face directory",
        description="Convert an original adept-inference checkpoint (iter_*/mp_rank_00/model_optim_rng.pt "
                    "+ adept_vocab.model) into a Hugging Face directory: config.json, safetensors shards and "
                    "tokenizer files. The adept-inference source is not needed. Shapes, rotary dims and "
                    "rope theta are read from the tensors.")
    convert.add_argument("checkpoint", help="checkpoint root (holding iter_* folders), an iter_* folder, "
                                            "or the model_optim_rng.pt file")
    _add_out(convert, "checkpoint directory", "a checkpoint")
    convert.add_argument("--tokenizer", help="adept_vocab.model (default: next to the iter_* folders)")
    convert.add_argument("--dtype", choices=DTYPES,
                         help="cast floating-point weights (default: keep the checkpoint's dtype)")
    convert.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size (default 2)")
    convert.set_defaults(run=_convert)


def _add_build(commands) -> None:
    build = commands.add_parser(
        "build", help="checkpoint -> build directory (ONNX model, tokenizer, manifest)",
        description="Export a Hugging Face Persimmon checkpoint directory (with tokenizer files) into a "
                    "self-describing build directory: model.onnx + model.onnx.data (one model step over a "
                    "fixed-capacity KV cache, custom ops for QK-LayerNorm and partial rotary), tokenizer.model "
                    "and manifest.json. Weights are streamed, so the 8B model exports in a few GiB of RAM.")
    build.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    _add_out(build, "build directory", "a build")
    _add_build_options(build)
    _add_json(build, "the build's summary (task, dtype, capacity, ONNX versions, engine, bytes)")
    build.set_defaults(run=_build)


def _add_build_options(build: argparse.ArgumentParser) -> None:
    """The flags `_build_options` turns into BuildOptions; left out, each is None and BuildOptions'
    own default applies (the defaults the help texts name live there)."""
    build.add_argument("--dtype", choices=DTYPES,
                       help="weights, activations and KV cache (default float16; LayerNorm, softmax and logits "
                            "stay fp32). bfloat16 (fp32's range, no relu^2 scale, 8-bit mantissa) is for TensorRT "
                            "engines only (--backend tensorrt or tensorrt-rtx): onnxruntime's CPU provider cannot "
                            "run it")
    build.add_argument("--task", choices=list(TASKS),
                       help="what the build computes (default: from config.json's architectures, else causal-lm): a "
                            "classifier build has no KV cache and gives logits per text or per token, for texts of "
                            "up to --max-text-tokens (docs/classification.md)")
    build.add_argument("--max-batch", type=int, help="largest batch the runtime will run (default 8)")
    # --max-seq: the flag's first name, kept so that existing scripts still build
    build.add_argument("--kv-capacity", "--max-seq", dest="kv_capacity", type=int, metavar="SLOTS",
                       help="KV cache slots per sequence, prompt + generated tokens: the manifest's kv_capacity "
                            "(default: 4096, or the model's max_position_embeddings if smaller; --max-seq is an "
                            "older name of this flag); causal-lm builds")
    build.add_argument("--max-text-tokens", type=int, metavar="N",
                       help="classifier builds (no cache): the most tokens per text (default: as --kv-capacity's)")
    build.add_argument("--backend", choices=BUILD_BACKENDS,
                       help="tensorrt: also build an NVIDIA TensorRT engine (10.9 - 11.x; for the GPU it builds on); "
                            "tensorrt-rtx: a TensorRT-RTX engine (1.7 - 1.x; builds without a GPU, runs on the RTX "
                            "GPUs of --compute-capabilities); auto (default): tensorrt when NVIDIA TensorRT is "
                            "importable, else onnxruntime (never tensorrt-rtx)")
    build.add_argument("--calibration-file", metavar="FILE",
                       help="float16 builds: prompts, one per line (at most 64, 4000 characters each), for the range "
                            "report that chooses the relu^2 scales and goes into the manifest (default: a built-in "
                            "set of varied texts)")
    build.add_argument("--weights", metavar="{int8,int4}",
                       help="weight-only quantization: the linear weights as block-wise symmetric int8 or int4 "
                            "(onnxruntime: MatMulNBits; TensorRT: DequantizeLinear into the MatMul; activations and "
                            "cache stay --dtype; docs/quantization.md). Default: weights in --dtype")
    build.add_argument("--block-size", type=int, metavar="N",
                       help="with --weights: inputs per scale, a power of two >= 16 dividing every linear's inputs "
                            "(default 32; TensorRT int8 uses one scale per output channel instead)")
    build.add_argument("--prefill", metavar="{int8,none}",
                       help="int8: add a prefill graph whose linears and lm_head multiply int8 weights (one scale "
                            "per output channel) by activations quantized per token at run time, for CPUs with "
                            "integer matrix units (AMX-INT8, AVX512-VNNI, AVX-VNNI), which run prompts 2-3x faster "
                            "that way; the runtime uses it where the CPU has them, for steps of 16+ tokens per row. "
                            "Costs 1 byte per linear weight of disk and memory; onnxruntime builds only. Default: "
                            "int8 with --weights, none without (a float build stays exact; docs/quantization.md)")
    build.add_argument("--kv-cache", metavar="{int8}",
                       help="int8: keep the KV cache as int8, one scale per (head, channel) of each layer's keys and "
                            "values, chosen from the fp32 reference's largest values on the calibration prompts (x1.25 "
                            "headroom): a quarter of the cache memory and faster long-context decode. onnxruntime "
                            "builds of --dtype float32 only; needs onnxruntime 1.31 or newer at run time "
                            "(docs/quantization.md). Default: the cache in --dtype")
    trt = build.add_argument_group("TensorRT engine (--backend tensorrt or tensorrt-rtx)")
    trt.add_argument("--max-prefill", type=int,
                     help="most new tokens in one prefill step (profile 0; default min(kv-capacity, 2048))")
    trt.add_argument("--plugins", choices=PLUGIN_CHOICES,
                     help="custom ops as ahead-of-time plugin kernels (tensorrt only; needs nvcc at build time) or, "
                          "off, as the ONNX function bodies; auto (default) uses them when possible")
    trt.add_argument("--compute-capabilities", nargs="+", metavar="X.Y",
                     help="tensorrt-rtx only: the GPUs the engine runs on (default: every target TensorRT-RTX "
                          "offers except 7.5, e.g. 8.0 8.6 8.9 12.0 12.1)")
    trt.add_argument("--version-compatible", action="store_true",
                     help="tensorrt only: engine that also loads on newer TensorRT (e.g. in a Triton container)")
    trt.add_argument("--timing-cache", help="tensorrt only: timing cache file, read and updated (speeds up rebuilds)")
    trt.add_argument("--opt-level", type=int, choices=range(6), help="builder optimization level (3)")
    trt.add_argument("--workspace-gb", type=float, help="builder workspace memory pool limit")


def _add_parity(commands) -> None:
    parity = commands.add_parser(
        "parity", help="compare a build against the torch reference",
        description="Run the fp32 torch reference and the built artifact on sample prompts; print, per backend, "
                    "the max abs logits difference through prefill and N greedy decode steps, top-1 agreement "
                    "and greedy token agreement against bounds (fp32: 1e-3 and identical greedy tokens; fp16: "
                    "2% of the largest |logit| and top-1 >= 95%; --weights int8 / int4 builds: 5% / 60% and "
                    "top-1 >= 80% / 25%, docs/quantization.md). Exits 1 when a bound is broken.")
    parity.add_argument("--checkpoint", required=True, help="the Hugging Face checkpoint the build came from")
    parity.add_argument("--build", required=True, help="build directory")
    parity.add_argument("--backend", nargs="*", default=["onnxruntime"],
                        help="backends to check (default onnxruntime); none, with --emulate, checks only the "
                             "true-precision evaluation (a bfloat16 build on a machine without a GPU)")
    parity.add_argument("--device", help="cpu, cuda or cuda:N (default: each backend's own)")
    parity.add_argument("--steps", type=int, default=16, help="greedy decode steps after prefill (default 16)")
    parity.add_argument("--prompt", action="append", help="a prompt (repeatable; default: three built-in ones)")
    parity.add_argument("--max-abs-diff", type=float, help="override the logits bound")
    parity.add_argument("--min-top1", type=float, help="override the top-1 agreement bound (0..1)")
    parity.add_argument("--emulate", action="store_true",
                        help="also evaluate the build's ONNX graph on CPU in true precision (fp16 stored and computed "
                             "in fp16, as a TensorRT engine does; onnxruntime's CPU provider computes fp16 graphs in "
                             "fp32 and hides fp16 overflow), same prompts and steps, same bounds; slow: small models")
    _add_json(parity, "every result (differences, bounds, agreement, passed) and the verdict; exit status as without")
    parity.set_defaults(run=_parity)


def _add_triton(commands) -> None:
    triton = commands.add_parser(
        "triton", help="build directory -> Triton Inference Server model repository",
        description="Write a Triton model repository: a decoupled Python-backend model serving text through "
                    "Triton's generate / generate_stream endpoints and gRPC streaming (sampling settings as request "
                    "parameters, streamed text, stop strings, cancellation), running the build with "
                    "persimmon_runtime (TensorRT builds on its TensorRT backend). The build's manifest and the files "
                    "it lists (regular files only) are hard-linked into the repository where possible.")
    triton.add_argument("--build", required=True, help="build directory (from `persimmon-export build`)")
    _add_out(triton, "model repository directory", "a model repository")
    triton.add_argument("--name", default="persimmon", help="model name (default persimmon)")
    triton.add_argument("--kind", choices=KINDS, default="auto",
                        help="instance_group kind; auto: GPU when the build has a TensorRT engine")
    triton.add_argument("--instances", type=int, default=1, help="model instances (per GPU for GPU kind), 1-64")
    triton.add_argument("--generate-timeout", type=float, default=300.0,
                        help="seconds after which a non-streaming generate request is stopped (its client cannot "
                             "be seen leaving); 0: no limit (default 300)")
    triton.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                        help="classifier builds: how long Triton's dynamic batcher waits for requests to fill a "
                             "batch (default 5)")
    triton.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="runtime backend inside the model (default auto)")
    triton.add_argument("--prefill", choices=PREFILL_CHOICES, default="auto",
                        help="prompt steps on the build's int8 prefill graph (onnxruntime on CPU): auto (default) "
                             "where the CPU has AMX-INT8/AVX512-VNNI/AVX-VNNI, int8 always, off never; the model's "
                             "`prefill` parameter")
    triton.add_argument("--python-path", action="append", default=[],
                        help="a directory the model adds to sys.path (where persimmon_runtime and its "
                             "dependencies live on the server); repeatable")
    triton.set_defaults(run=_triton)


def _add_doctor(commands) -> None:
    doctor = commands.add_parser(
        "doctor", help="what this machine can do (TensorRT, GPU, onnxruntime, plugins)",
        description="Print the versions and capabilities that builds depend on - TensorRT (or why it is "
                    "missing), the GPU, onnxruntime's execution providers, whether the plugin kernels compile - "
                    "each with the reason when something is missing. Run it first when a build fails.")
    _add_json(doctor, "an object of item -> finding")
    doctor.set_defaults(run=_doctor)


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo", help="make a tiny random Persimmon checkpoint + tokenizer and generate from it",
        description="Train a tiny sentencepiece tokenizer, write a tiny random-weight Persimmon checkpoint in "
                    "Hugging Face layout, load it back and stream a greedy chat answer. No downloads.")
    demo.add_argument("--out", default="demo/checkpoint",
                      help="where to write the checkpoint: a new or empty directory (default demo/checkpoint)")
    demo.add_argument("--overwrite", action="store_true", help="replace the checkpoint an earlier demo wrote there")
    demo.add_argument("--prompt", default="What is the capital of France?", help="the human turn")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.set_defaults(run=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persimmon-export",
        description="Turn Persimmon-8B checkpoints into deployable artifacts. Results go to stdout, logs and "
                    "progress to stderr; bad input is one line on stderr and exit status 2 (parity: 1 when a "
                    "bound breaks). build, parity, convert and demo need the exporter's extra (pip install "
                    "'.[export]' in a checkout); doctor and triton run on a runtime-only install.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(commands)
    _add_build(commands)
    _add_parity(commands)
    _add_triton(commands)
    _add_doctor(commands)
    _add_demo(commands)
    for command in commands.choices.values():
        add_verbosity_flags(command)
    return parser




def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbosity)
    return run_command(f"persimmon-export {args.command}", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
