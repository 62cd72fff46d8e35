"""The `leantune` command: parses arguments and hands each verb to its module in leantune.commands.

Building the parser imports no torch or transformers (command modules keep those imports inside
`run`, and `import leantune` is lazy), so `leantune --help` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings
from typing import Iterator

from .errors import LeantuneError

# verb -> (module under leantune.commands, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("train", "fine-tune a model (no config: the embedded default job)"),
    "eval": ("evaluate", "loss and perplexity of a model or adapter on a dataset"),
    "generate": ("generate", "generate text with a model or adapter"),
    "bench": ("bench", "measure step time and memory of every method side by side"),
    "sketch": ("sketch", "compress a model into fine-tunable SketchTune sketches"),
    "export": ("export", "export an adapter (e.g. to Hugging Face PEFT format)"),
    "serve": ("serve", "serve a model and its adapters over an OpenAI-compatible HTTP API"),
    "study": ("study", "run the unit-test generation study: every method trained, its tests judged"),
}

# Libraries whose warnings, log lines and progress bars are not a command's output.
NOISY_LIBRARIES = ("transformers", "bitsandbytes", "peft", "huggingface_hub", "accelerate", "torch")
_NOISY_MODULES = r"(" + "|".join(NOISY_LIBRARIES) + r")(\.|$)"
# Read by transformers and huggingface_hub when a command first imports them (and by bench workers).
QUIET_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


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


@contextlib.contextmanager
def library_noise_silenced() -> Iterator[None]:
    """Keep library warnings, log lines and weight-loading bars out of the output; restore them after."""
    saved_environment = {key: os.environ.get(key) for key in QUIET_ENVIRONMENT}
    loggers = [logging.getLogger(name) for name in NOISY_LIBRARIES]
    saved_levels = [logger.level for logger in loggers]
    bars_were_on = _transformers_progress_bars(enabled=False)
    os.environ.update(QUIET_ENVIRONMENT)
    for logger in loggers:
        logger.setLevel(logging.ERROR)  # for libraries already imported (and bitsandbytes, which reads no variable)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=_NOISY_MODULES)
            yield
    finally:
        for key, value in saved_environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for logger, level in zip(loggers, saved_levels):
            logger.setLevel(level)
        if bars_were_on:
            _transformers_progress_bars(enabled=True)


def _transformers_progress_bars(enabled: bool) -> bool:
    """Switch transformers' bars if it is imported already (else the environment does it); were they on?"""
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is None:
        return False
    were_on = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    return were_on


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        with library_noise_silenced():
            return int(args.run(args) or 0)
    except LeantuneError as err:
        print(f"leantune {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leantune {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
