"""`leantune train [CONFIG.yaml] [--set key=value ...] [--resume] [--overwrite]`."""
from __future__ import annotations

import argparse

EXIT_INTERRUPTED = 130

USAGE_NOTES = """\
With no CONFIG the embedded default job runs (leantune/configs/default.yaml): SmolLM2-135M
learns to write unit tests for HumanEval functions, then prints a before/after table.
A commented example with every key: configs/example.yaml.

Ctrl-C saves a checkpoint and prints the command that resumes the run.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.config import keys_help  # light (no torch): the epilog lists every config key

    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                        help="training config (YAML); omitted: the embedded default job")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for nested keys (method.r=16, data.eval=null); repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in out_dir from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in a non-empty out_dir")
    parser.epilog = USAGE_NOTES + "\n" + keys_help()


def run(args: argparse.Namespace) -> int:
    # imported here, not at module level: `leantune --help` must not load torch
    from ..training import load_config, train

    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume, overwrite=args.overwrite, command=_rebuild_command(args))
    return EXIT_INTERRUPTED if result.interrupted else 0


def _rebuild_command(args: argparse.Namespace) -> list[str]:
    """The command line that gives the same config, without out_dir (the resume hint adds the real one)."""
    words = ["leantune", "train"] + ([args.config] if args.config else [])
    for override in args.overrides:
        if override.partition("=")[0].strip() != "out_dir":
            words += ["--set", override]
    return words
