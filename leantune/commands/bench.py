"""`leantune bench`: step time and memory of every method side by side, with PEFT and the floor."""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bench.rows import DEFAULT_METHODS as _DEFAULT_ROWS
from ..errors import LeantuneError

if TYPE_CHECKING:
    from ..bench.runner import BenchPlan

DEFAULT_METHODS = ",".join(_DEFAULT_ROWS)
# The project's acceptance targets, beside the results folder; judged when the file is there.
DEFAULT_TARGETS = Path("benchmarks") / "targets.json"
LOSS_CHOICES = {"on": ["chunked"], "off": ["full"], "both": ["full", "chunked"]}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}

EPILOG = """\
examples:
  leantune bench --peft                                 every method next to PEFT's LoRA, DoRA, (IA)3
  leantune bench --methods floor,lora,paca --peft --chunked-loss both
  leantune bench --methods lora,paca --peft --max-seq-len --mem-cap 6GiB
  leantune bench --methods paca --set paca.r=32 --profile

Each configuration runs in its own process; rows are interleaved across repeats. Results go to
benchmarks/results/<date>-<device>/ (results.json, results.md, profile.md), rewritten after every
measurement so a stopped run keeps its rows; chart.png comes last, where matplotlib is installed.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated rows: floor, full, leantune methods, peft-lora/peft-dora/peft-ia3/peft-lora-fa/peft-prompt/peft-prefix (default: {DEFAULT_METHODS})")
    parser.add_argument("--peft", action="store_true", help="add Hugging Face PEFT's LoRA, DoRA and (IA)3 rows, and each listed row's PEFT counterpart")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per process (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per configuration, interleaved (default: 3)")
    parser.add_argument("--chunked-loss", choices=sorted(LOSS_CHOICES), default="on",
                        help="the memory-lean chunked loss, the full-logits loss, or both as pairs of rows (default: on)")
    parser.add_argument("--max-seq-len", action="store_true",
                        help="also find each method's longest batch-1 sequence under --mem-cap (bisection)")
    parser.add_argument("--mem-cap", default="6GiB", help="memory cap for --max-seq-len (default: 6GiB)")
    parser.add_argument("--seq-step", type=int, default=128, help="granularity of the --max-seq-len search (default: 128)")
    parser.add_argument("--seq-limit", type=int, default=8192, help="longest sequence --max-seq-len tries (default: 8192)")
    parser.add_argument("--seq-start", type=int, default=1024, help="first length --max-seq-len probes (default: 1024)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: float32)")
    parser.add_argument("--set", action="append", default=[], metavar="ROW.KEY=VALUE",
                        help="change one setting of one row, e.g. paca.r=32 (repeatable)")
    parser.add_argument("--profile", action="store_true", help="profile one step per row into profile.md")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a worker is killed (default: 1800)")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<date>-<device>)")
    parser.add_argument("--targets", default=None, metavar="FILE.json",
                        help=f"acceptance targets to judge the rows against (default: {DEFAULT_TARGETS}, if present)")


def parse_size(text: str) -> int:
    """'6GiB' -> 6 * 2**30; plain numbers are bytes."""
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise LeantuneError(f"--mem-cap '{text}' is not a size like 6GiB, 6000MB or 6442450944")
    return int(float(match.group(1)) * _UNITS[unit])


def _check_counts(args: argparse.Namespace) -> None:
    for name, minimum in (("batch", 1), ("seq", 2), ("steps", 1), ("warmup", 0), ("repeats", 1),
                          ("seq_step", 1), ("seq_limit", 2), ("seq_start", 1)):
        value = getattr(args, name)
        if value < minimum:
            raise LeantuneError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if args.seq_limit < args.seq_step:
        raise LeantuneError(f"--seq-limit ({args.seq_limit}) must be at least --seq-step ({args.seq_step})")


def _resolve_device(text: str) -> str:
    import torch  # not at module level: `leantune --help` must not load torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    if re.fullmatch(r"cuda(:\d+)?", text):
        if not torch.cuda.is_available():
            raise LeantuneError(f"--device {text}: no CUDA GPU is available")
        return text
    raise LeantuneError(f"--device '{text}' must be cpu, cuda, cuda:N or auto")


def canonical_command(args: argparse.Namespace) -> str:
    """The command with every setting spelled out, so a rerun reproduces the run."""
    parts = ["leantune", "bench", "--model", args.model, "--methods", args.methods]
    parts += ["--peft"] if args.peft else []
    parts += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--chunked-loss", args.chunked_loss,
              "--device", args.device, "--dtype", args.dtype]
    if args.max_seq_len:
        parts += ["--max-seq-len", "--mem-cap", args.mem_cap, "--seq-step", str(args.seq_step),
                  "--seq-limit", str(args.seq_limit), "--seq-start", str(args.seq_start)]
    for item in args.set:
        parts += ["--set", item]
    parts += ["--profile"] if args.profile else []
    parts += ["--out", args.out] if args.out else []
    parts += ["--targets", args.targets] if args.targets else []
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    # imported here, not at module level: `leantune --help` must not load torch
    from ..bench.report import (default_out_dir, machine_info, render_markdown, start_results, write_results,
                                write_tables)
    from ..bench.rows import parse_overrides, parse_row_names, row_kind
    from ..bench.runner import BenchPlan, run_plan
    from ..bench.targets import read_targets
    from ..models import TINY_MODELS, resolve_model_path

    _check_counts(args)
    rows = parse_row_names(args.methods, args.peft)
    overrides = parse_overrides(args.set, rows)
    mem_cap = parse_size(args.mem_cap)
    device = _resolve_device(args.device)
    if args.model not in TINY_MODELS:
        resolve_model_path(args.model)  # an unknown model is a user error, not one error per row
    if any(row_kind(r) == "peft" for r in rows) and importlib.util.find_spec("peft") is None:
        raise LeantuneError("the peft-* rows need Hugging Face PEFT: pip install peft "
                            "(or install leantune with its 'bench' extra)")
    targets_file = args.targets or (DEFAULT_TARGETS if DEFAULT_TARGETS.is_file() else None)
    targets = read_targets(targets_file) if targets_file else []

    plan = BenchPlan(model=args.model, rows=rows, losses=LOSS_CHOICES[args.chunked_loss], batch=args.batch,
                     seq=args.seq, steps=args.steps, warmup=args.warmup, repeats=args.repeats, device=device,
                     dtype=args.dtype, profile=args.profile, overrides=overrides, max_seq_len=args.max_seq_len,
                     mem_cap=mem_cap if args.max_seq_len else None, seq_step=args.seq_step,
                     seq_limit=args.seq_limit, seq_start=args.seq_start, timeout_s=args.timeout)
    out_dir = Path(args.out) if args.out else default_out_dir(device)
    start_results(out_dir)
    header = _header(args, plan, device, machine_info(device), targets)
    total = len(rows) * len(plan.losses) * plan.repeats
    print(f"leantune bench: {len(rows)} rows × {len(plan.losses)} loss(es) × {plan.repeats} repeats on {device}; "
          f"results in {out_dir}", flush=True)

    def keep_partial(measured: list[dict]) -> None:
        done = sum(entry["repeats"] + len(entry["errors"]) for entry in measured)
        write_tables({**header, "rows": measured, "complete": False,
                      "progress": f"{done} of at most {total} runs done"}, out_dir)

    try:
        result = run_plan(plan, log=lambda line: print(line, flush=True), on_update=keep_partial)
    except KeyboardInterrupt:
        print(f"the rows measured so far are in {out_dir}", file=sys.stderr)
        raise
    document = {**header, "rows": result["rows"]}
    write_results(document, out_dir, log=lambda line: print(line, flush=True))
    print(render_markdown(document))
    print(f"\nwritten to {out_dir}")
    return 0 if any(not e.get("error") for e in result["rows"]) else 1


def _header(args: argparse.Namespace, plan: BenchPlan, device: str, machine: dict,
            targets: list[dict[str, Any]]) -> dict:
    """Everything results.json holds besides the rows: the command, the machine, the settings, the targets."""
    return {
        "command": canonical_command(args),
        "argv": sys.argv,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            "model": args.model, "rows": plan.rows, "losses": plan.losses, "batch": args.batch, "seq": args.seq,
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "dtype": args.dtype,
            "device": device, "profile": args.profile, "overrides": plan.overrides, "max_seq_len": args.max_seq_len,
            "mem_cap_bytes": plan.mem_cap, "seq_step": args.seq_step, "seq_limit": args.seq_limit,
            "optimizer": "AdamW(lr=1e-4) over the trainable parameters; none for the floor",
        },
        "targets": targets,
    }
