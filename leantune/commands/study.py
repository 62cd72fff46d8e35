"""`leantune study unit-tests [--model M ...] [--methods a,b] [--config study.yaml] [--epochs N]
[--quick] [--out DIR] [--resume] [--overwrite]`."""
from __future__ import annotations

import argparse
import sys

EXIT_INTERRUPTED = 130
DEFAULT_OUT = "runs/study-unit-tests"

USAGE_NOTES = """\
The empirical study of PEFT for unit-test generation (Storhaug & Li), for Python: each method is
trained on the humaneval-tests train split (or a JSONL of {"code", "test", "entry_point"} given as
`data` in the study YAML), writes one test per held-out function (greedy), and each test is judged
in the sandbox: syntax, pass on the reference solution, line and branch coverage of the function,
mutation score, CodeBLEU. Costs per method: trainable parameters, training time, peak memory.
The base model is asked with the training prompt and with its chat template.

Every method trains in a fresh process; finished methods are kept, and Ctrl-C stops the running one
with a checkpoint: rerun with --resume to continue. Results: OUT/results.md, results.json, charts.
Budget on a 2-core CPU (SmolLM2-135M, the seven rows): 46 minutes measured alone; --quick about ten.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", choices=["unit-tests"], help="the study to run")
    parser.add_argument("--model", dest="models", action="append", metavar="MODEL",
                        help="model to study (repeatable: one block of rows per model); default smollm2-135m")
    parser.add_argument("--methods", help="comma-separated rows: base,full,lora,ia3,prompt,paca,sketchtune (default: all)")
    parser.add_argument("--config", metavar="STUDY.yaml", help="study settings (keys: see the study docs)")
    parser.add_argument("--epochs", type=float, help="training epochs per method (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="8 functions, 5 steps per method, 10 mutants per function: about ten minutes")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--resume", action="store_true", help="continue the study in --out: finished rows are kept")
    parser.add_argument("--overwrite", action="store_true", help="replace the study in --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.epilog = USAGE_NOTES


def run(args: argparse.Namespace) -> int:
    # imported here, not at module level: `leantune --help` must not load torch
    from pathlib import Path

    from ..errors import LeantuneError
    from ..studies.study_config import study_config
    from ..studies.unit_test_study import StudyInterrupted, run_study
    from ..training.config import load_yaml

    if args.resume and args.overwrite:
        raise LeantuneError("--resume and --overwrite contradict each other; pass one")
    document = load_yaml(args.config) if args.config else {}
    if not isinstance(document, dict):
        raise LeantuneError(f"study config '{args.config}' must be a mapping of keys")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    config = study_config(document, quick=args.quick, models=args.models, methods=methods, epochs=args.epochs)
    try:
        results = run_study(config, Path(args.out), resume=args.resume, overwrite=args.overwrite,
                            progress=args.progress)
    except StudyInterrupted as stopped:
        print(f"\nstudy stopped during {stopped}; finished rows are kept. Continue with:\n  "
              + " ".join(_resume_command()), file=sys.stderr)
        return EXIT_INTERRUPTED
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    if results["failed"]:
        print(f"rows that failed (rerun with --resume): {', '.join(results['failed'])}", file=sys.stderr)
        return 1
    return 0


def _resume_command() -> list[str]:
    words = ["leantune"] + [w for w in sys.argv[1:] if w not in ("--resume", "--overwrite")]
    return words + ["--resume"]
