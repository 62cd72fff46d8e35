"""`leantune sketch`: compress a model into a fine-tunable SketchTune sketch and report what it costs.

Fits the sketch on calibration text, writes it to --out, and reports the per-layer reconstruction
error ‖(W − Ŵ)X‖/‖WX‖, the size of the targeted weights before and after, the fitting time, and
the perplexity of the original and the sketched model on held-out text.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..builtin_datasets import HUMANEVAL_TESTS
from ..errors import LeantuneError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    parser.add_argument("--bits", type=int, default=4, help="bits per code: 2^bits table entries (default: 4)")
    parser.add_argument("--groups-per-row", type=int, default=1, choices=(1, 2, 4, 8),
                        help="tables per row, each for a contiguous group of columns (default: 1)")
    parser.add_argument("--calib", default=HUMANEVAL_TESTS,
                        help=f"calibration text: '{HUMANEVAL_TESTS}' (its train split) or a text file "
                             f"(default: {HUMANEVAL_TESTS})")
    parser.add_argument("--heldout", default=None,
                        help=f"held-out text for perplexity: '{HUMANEVAL_TESTS}' (its test split), a text file, "
                             f"or 'none' (default: {HUMANEVAL_TESTS} when calibrating on it, else none)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (default: 64)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--targets", default="all-linear", help="modules to sketch (default: all-linear)")
    parser.add_argument("--damp", type=float, default=0.01, help="Hessian damping, a fraction of mean diag H (default: 0.01)")
    parser.add_argument("--act-order", action="store_true", help="assign columns in order of decreasing diag H")
    parser.add_argument("--table-dtype", default="float16", choices=("float16", "float32"),
                        help="dtype of the stored tables (default: float16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets (default: 0)")
    parser.add_argument("--out", default=None, help="sketch directory (default: out/sketch-MODEL-bBITS-gGROUPS)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing sketch in --out (adapters trained on it will no longer load)")


def run(args: argparse.Namespace) -> int:
    # imported here, not at module level: `leantune --help` must not load torch
    from .. import models
    from ..api import attach
    from ..files import atomic_write_text
    from ..methods.sketch import SketchTune
    from ..methods.sketch.calib import (check_source, consecutive_windows, perplexity, source_name, source_text,
                                        tokenize)
    from ..methods.sketch.pack import FIT_REPORT_FILE, save_sketch

    out = Path(args.out or f"out/sketch-{args.model.replace('/', '_')}-b{args.bits}-g{args.groups_per_row}")
    targets = args.targets if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
    config = SketchTune(bits=args.bits, groups_per_row=args.groups_per_row, calib=args.calib, samples=args.samples,
                        seq_len=args.seq_len, damp=args.damp, act_order=args.act_order,
                        table_dtype=args.table_dtype, seed=args.seed, targets=targets)
    heldout = args.heldout or (HUMANEVAL_TESTS if args.calib == HUMANEVAL_TESTS else "none")
    for source in (args.calib, heldout):
        if source != "none":
            check_source(source)
    _refuse_to_replace(out, args.overwrite)
    used = {**{k: v for k, v in vars(args).items() if k != "run"}, "out": str(out.resolve()), "targets": targets,
            "calib": source_name(args.calib), "heldout": heldout if heldout == "none" else source_name(heldout)}

    model = models.load_model(args.model)
    tokenizer = models.load_tokenizer(args.model)
    windows = None
    if heldout != "none":
        windows = consecutive_windows(tokenize(tokenizer, source_text(heldout, "test")), args.seq_len)
    report: dict = {"model": args.model, "arguments": used}  # the values used, defaults filled in
    if windows is not None:
        started = time.perf_counter()
        report["perplexity_original"] = perplexity(model, windows)
        print(f"perplexity of the original model on {windows.shape[0]} x {args.seq_len} held-out tokens: "
              f"{report['perplexity_original']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)

    def progress(info: dict) -> None:
        print(f"  {info['name']:<40} ‖(W−Ŵ)X‖/‖WX‖ = {info['relative_error']:.4f}", flush=True)

    print(f"fitting {args.bits}-bit sketch, {args.groups_per_row} table(s) per row, on {args.samples} x "
          f"{args.seq_len} tokens of {args.calib}...", flush=True)
    sketch, fit_report = config.fit(model, tokenizer, progress)
    report.update(fit_report)
    report.update(_sizes(model, sketch))
    save_sketch(sketch, out, report)

    if windows is not None:
        attach(model, SketchTune(sketch=str(out)))
        report["perplexity_sketched"] = perplexity(model, windows)
        report["perplexity_ratio"] = report["perplexity_sketched"] / report["perplexity_original"]
    atomic_write_text(out / FIT_REPORT_FILE, json.dumps(report, indent=2, sort_keys=True))
    print(_summary(report, out))
    return 0


def _refuse_to_replace(out: Path, overwrite: bool) -> None:
    """A sketch that adapters were trained on must not vanish under them by accident."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise LeantuneError(f"sketch directory '{out}' already exists; choose another --out or pass --overwrite "
                            "(adapters trained on the old sketch will no longer load)")


def _sizes(model, sketch) -> dict:
    targeted = sum(layer.out_features * layer.in_features for layer in sketch.layers.values())
    everything = sum(p.numel() for p in model.parameters())
    return {
        "targeted_parameters": targeted,
        "targeted_bytes_float32": 4 * targeted,
        "targeted_bytes_float16": 2 * targeted,
        "targeted_bytes_sketch": sketch.nbytes(),
        "sketch_to_float16": sketch.nbytes() / (2 * targeted),
        "model_bytes_float32": 4 * everything,
        "model_bytes_sketched": 4 * (everything - targeted) + sketch.nbytes(),
    }


def _summary(report: dict, out: Path) -> str:
    errors = [info["relative_error"] for info in report["layers"].values()]
    mib = 2 ** 20
    lines = [
        f"sketch written to {out}",
        f"layers: {len(errors)}, reconstruction error mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f}",
        f"targeted weights: {report['targeted_bytes_float32'] / mib:.1f} MiB float32, "
        f"{report['targeted_bytes_float16'] / mib:.1f} MiB float16 -> {report['targeted_bytes_sketch'] / mib:.1f} MiB "
        f"sketched ({report['sketch_to_float16']:.3f} x float16)",
        f"whole model: {report['model_bytes_float32'] / mib:.1f} MiB -> {report['model_bytes_sketched'] / mib:.1f} MiB "
        "(other tensors kept in float32)",
        f"fitting time: {report['fit_seconds']:.0f} s ({report['calibration_seconds']:.0f} s of calibration passes "
        f"and Hessians, {report['table_seconds']:.0f} s of tables and codes)",
    ]
    if "perplexity_sketched" in report:
        lines.append(f"held-out perplexity: original {report['perplexity_original']:.3f}, sketched "
                     f"{report['perplexity_sketched']:.3f} (x{report['perplexity_ratio']:.3f})")
    return "\n".join(lines)
