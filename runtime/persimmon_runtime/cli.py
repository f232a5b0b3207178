"""`persimmon-run BUILD_DIR "prompt"`: one-off generation from a build directory, streamed.

stdout carries the generated text only; progress (the first load's checksum verification) and
the closing report (finish reason, tokens, tokens/s) go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .backends import BACKEND_CHOICES
from .console import add_verbosity_flags, configure_logging, run_command, utf8_argument
from .cpu import PREFILL_CHOICES

log = logging.getLogger("persimmon_runtime.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persimmon-run",
        description="Generate text from a Persimmon build directory (made by `persimmon-export build`). "
                    "Text is streamed to stdout as it is decoded; progress and a closing report (finish "
                    "reason, tokens, tokens/s) go to stderr. Temperature 0 (the default) is greedy.")
    parser.add_argument("build", help="build directory")
    parser.add_argument("prompt", help="prompt text (with --chat: the human turn)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as 'human: ...\\n\\nadept:'")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    parser.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="auto (default): TensorRT when the build has an engine and a GPU can run it")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the backend's own, cuda for TensorRT)")
    parser.add_argument("--prefill", default="auto", choices=PREFILL_CHOICES,
                        help="prompt steps on the build's int8 prefill graph (onnxruntime): auto (default) where "
                             "the CPU has AMX-INT8, AVX512-VNNI or AVX-VNNI, int8 always, off never; -v says which")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the sha256 check of the build's files (by default done once per change of a "
                             "file, then remembered in ~/.cache/persimmon)")
    add_verbosity_flags(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbosity)
    return run_command("persimmon-run", lambda: _run(args))


def _run(args) -> None:
    from .chat import format_chat
    from .generator import Generator
    from .sampling import SamplingParams

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                    ignore_eos=args.ignore_eos)
    prompt = utf8_argument("prompt", args.prompt)
    SamplingParams.from_settings(sampling)  # bad settings are refused before the load (a minute at 8B)
    generator = Generator.load(args.build, backend=args.backend, device=args.device,
                               verify_checksums=not args.no_verify, prefill=args.prefill)
    log.debug(f"{generator.backend.name}: prefill {generator.backend.prefill_kernels}")
    prompt = format_chat(prompt, generator.manifest.tokenizer.chat_template) if args.chat else prompt
    started, finished = time.perf_counter(), []
    if args.no_stream:
        finished.append(generator.generate(prompt, **sampling))
        print(finished[0].text)
    else:
        for piece in generator.stream(prompt, on_finish=finished.append, **sampling):
            print(piece, end="", flush=True)
        print()
    _report(finished[0], time.perf_counter() - started)


def _report(completion, seconds: float) -> None:
    """The closing line on stderr: why it stopped, how many tokens, how fast (prefill included)."""
    tokens = len(completion.token_ids)
    log.info(f"finish_reason {completion.finish_reason}: {completion.prompt_tokens} prompt tokens, {tokens} "
             f"generated in {seconds:.2f} s ({tokens / seconds if seconds > 0 else 0:.1f} tokens/s)")


if __name__ == "__main__":
    sys.exit(main())
