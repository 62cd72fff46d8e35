"""The `leantune` command: parses arguments and hands each verb to its module in leantune.commands.

Command modules keep heavy imports (torch, transformers) inside `run`, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LeantuneError

# verb -> (module under leantune.commands, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("train", "fine-tune a model (no config: the embedded default job)"),
    "eval": ("evaluate", "loss and perplexity of a model or adapter on a dataset"),
    "generate": ("generate", "generate text with a model or adapter"),
    "bench": ("bench", "measure step time and memory of every method side by side"),
    "sketch": ("sketch", "compress a model into fine-tunable SketchTune sketches"),
    "export": ("export", "export an adapter (e.g. to Hugging Face PEFT format)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leantune", description="Parameter-efficient fine-tuning that saves time and memory.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        module = importlib.import_module(f"leantune.commands.{module_name}")
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except LeantuneError as err:
        print(f"leantune {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leantune {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
