"""`persimmon-export`: thin argument parsing over the library; each subcommand is one call."""

from __future__ import annotations

import argparse
import sys

from persimmon_runtime.errors import PersimmonError


def _convert(args) -> None:
    from .convert import convert_megatron

    out = convert_megatron(args.checkpoint, args.out, tokenizer_file=args.tokenizer, dtype=args.dtype,
                           max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"done: {out}")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, prompt=args.prompt, max_new_tokens=args.max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persimmon-export",
        description="Turn Persimmon-8B checkpoints into deployable artifacts.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert", help="adept-inference (Megatron) checkpoint -> Hugging Face directory",
        description="Convert an original adept-inference checkpoint (iter_*/mp_rank_00/model_optim_rng.pt "
                    "+ adept_vocab.model) into a Hugging Face directory: config.json, safetensors shards and "
                    "tokenizer files. The adept-inference source is not needed. Shapes, rotary dims and "
                    "rope theta are read from the tensors.")
    convert.add_argument("checkpoint", help="checkpoint root (holding iter_* folders), an iter_* folder, "
                                            "or the model_optim_rng.pt file")
    convert.add_argument("--out", required=True, help="output directory (replaced only once complete)")
    convert.add_argument("--tokenizer", help="adept_vocab.model (default: next to the iter_* folders)")
    convert.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                         help="cast floating-point weights (default: keep the checkpoint's dtype)")
    convert.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size (default 2)")
    convert.set_defaults(run=_convert)

    demo = commands.add_parser(
        "demo", help="make a tiny random Persimmon checkpoint + tokenizer and generate from it",
        description="Train a tiny sentencepiece tokenizer, write a tiny random-weight Persimmon checkpoint in "
                    "Hugging Face layout, load it back and stream a greedy chat answer. No downloads.")
    demo.add_argument("--out", default="demo/checkpoint", help="where to write the checkpoint (default demo/checkpoint)")
    demo.add_argument("--prompt", default="What is the capital of France?", help="the human turn")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except PersimmonError as e:
        print(f"persimmon-export {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
