"""`leantune study unit-tests`: every (model, method) row of the study, each in a fresh process,
skipped when already finished, then the report (`study_report`).

Layout of OUT:
    study.json                       the settings that produced the results (a resume must match them)
    data/held_out.json               the held-out records every row wrote tests for
    <model>/sketch/                  SketchTune's sketch, fitted once per model
    <model>/<method>/run/            the method's training run (checkpoints: an interrupted run resumes)
    <model>/<method>/result.json     the finished row: costs, and every generated test with its outcome
    results.json, results.md, *.png  the report
"""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..data import prepare_dataset
from ..errors import LeantuneError
from ..files import atomic_write_text
from ..models import load_tokenizer
from ..training.config import build_config
from ..methods.sketch.pack import SKETCH_CONFIG_FILE
from .method_run import EXIT_INTERRUPTED, RESULT_FILE
from .study_config import BASE, RESULT_KEYS, StudyConfig, model_folder_name
from .study_data import prepare_data
from .study_report import write_report

STUDY_FILE = "study.json"
REPORT_FILES = ("results.json", "results.md")

Runner = Callable[[dict[str, Any]], int]  # a job spec -> exit status


class StudyInterrupted(Exception):
    """Ctrl-C stopped a row; finished rows and the row's last checkpoint are kept."""


def run_study(config: StudyConfig, out: Path, resume: bool = False, overwrite: bool = False, progress: bool = True,
              runner: Runner | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every row not finished yet, then write the report; returns results.json's content."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    runner = runner or run_in_subprocess
    out = Path(out).absolute()  # the rows' processes get absolute paths
    fits = check_row_configs(config, out)
    previous = _prepare_out(config, out, resume, overwrite)
    data = prepare_data(config.data, out, config.functions, config.split_seed, config.test_fraction, config.workers)
    digest = hashlib.sha256(json.dumps(data.held_out, sort_keys=True).encode()).hexdigest()
    if previous.get("held_out_digest") not in (None, digest):
        raise LeantuneError(f"--resume: the held-out functions differ from those of the study in '{out}' (was the "
                            "data file changed?); finished rows would not be comparable. Use a new --out")
    check_training_data(fits, data.train)
    atomic_write_text(out / STUDY_FILE, json.dumps({"config": config.to_dict(), "held_out_digest": digest},
                                                   indent=1) + "\n")
    held_out = out / "data" / "held_out.json"
    atomic_write_text(held_out, json.dumps(data.held_out, indent=1) + "\n")
    log(f"study: {len(config.methods)} methods x {len(config.models)} model(s), {len(data.held_out)} held-out "
        f"functions, results in {out}")
    failed = []
    for model in config.models:
        folder = out / model_folder_name(model)
        base_spec = {"model": model, "study": config.to_dict(), "train_source": data.train,
                     "eval_source": data.eval, "held_out": str(held_out), "sketch": str(folder / "sketch"),
                     "progress": progress}
        if "sketchtune" in config.methods and not (folder / "sketch" / SKETCH_CONFIG_FILE).is_file():
            log(f"[{model}] fitting the SketchTune sketch (once per model)...")
            _run_job(runner, {**base_spec, "job": "fit-sketch", "method": "sketchtune", "dir": str(folder / "sketch")})
        for index, method in enumerate(config.methods, start=1):
            row_dir = folder / method
            if (row_dir / RESULT_FILE).is_file():
                log(f"[{model}] {method}: finished earlier, kept")
                continue
            log(f"[{model}] {method} ({index}/{len(config.methods)})")
            if _run_job(runner, {**base_spec, "job": "row", "method": method, "dir": str(row_dir)}) != 0:
                failed.append(f"{model}/{method}")
    results = write_report(config, out)
    results["failed"] = failed
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    return results


def check_row_configs(config: StudyConfig, out: Path) -> dict[str, set[tuple[int, str]]]:
    """Each trained row's training config (methods_settings, training) is checked before anything in
    OUT is touched, rather than when its row starts, hours in; returns the (max_length, overlong)
    pairs each model's rows fit their data to."""
    fits: dict[str, set[tuple[int, str]]] = {}
    for model in config.models:
        fits[model] = set()
        for method in config.methods:
            if method == BASE:
                continue
            document = {**config.train_document(model, method, out), "data": {"train": config.data}}
            try:
                settings = build_config(document)
            except LeantuneError as err:
                raise LeantuneError(f"study: the {method} row's training config: {err}") from None
            fits[model].add((settings.max_length, settings.overlong))
    return fits


def check_training_data(fits: dict[str, set[tuple[int, str]]], train_source: str) -> None:
    """Training data that leaves no example at a row's max_length fails before the first row."""
    for model, pairs in fits.items():
        tokenizer = load_tokenizer(model) if pairs else None
        for max_length, overlong in sorted(pairs):
            prepare_dataset(train_source, tokenizer, max_length, overlong)


def _run_job(runner: Runner, spec: dict[str, Any]) -> int:
    Path(spec["dir"]).mkdir(parents=True, exist_ok=True)
    status = runner(spec)
    if status == EXIT_INTERRUPTED:
        raise StudyInterrupted(f"{spec['model']}/{spec['method']}")
    if status != 0 and spec["job"] == "fit-sketch":
        raise LeantuneError(f"fitting the SketchTune sketch of {spec['model']} failed (exit status {status}); "
                            "see the messages above, or leave sketchtune out of --methods")
    return status


def run_in_subprocess(spec: dict[str, Any]) -> int:
    """`python -m leantune.studies.method_run SPEC`; Ctrl-C reaches it and is waited for."""
    with tempfile.NamedTemporaryFile("w", prefix="leantune-study-", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    try:
        # a session of its own: the terminal's Ctrl-C reaches it once, forwarded from here (twice, and
        # the training loop would stop at once instead of saving a checkpoint)
        process = subprocess.Popen([sys.executable, "-m", "leantune.studies.method_run", handle.name],
                                   start_new_session=True)
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            while True:
                try:
                    process.wait()
                    break
                except KeyboardInterrupt:  # a second press: the row stops at once (its last checkpoint stays)
                    process.send_signal(signal.SIGINT)
            return EXIT_INTERRUPTED
    finally:
        Path(handle.name).unlink(missing_ok=True)


# -- OUT -----------------------------------------------------------------------------------------

def _prepare_out(config: StudyConfig, out: Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    """Check OUT for this run and record the study's settings; returns the earlier study.json (or {})."""
    recorded = out / STUDY_FILE
    previous: dict[str, Any] = {}
    if out.exists() and not out.is_dir():
        raise LeantuneError(f"--out '{out}' is a file; expected a directory")
    if recorded.is_file():
        if overwrite:
            _remove_study(out, json.loads(recorded.read_text()))
        elif resume:
            previous = json.loads(recorded.read_text())
            _check_same_study(previous, config, out)
        else:
            raise LeantuneError(f"'{out}' holds an earlier study; pass --resume to continue it or --overwrite to "
                                "replace it")
    elif out.is_dir() and any(out.iterdir()) and not resume:
        raise LeantuneError(f"--out '{out}' is not empty and holds no study; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(recorded, json.dumps({**previous, "config": config.to_dict()}, indent=1) + "\n")
    return previous


def _check_same_study(document: dict[str, Any], config: StudyConfig, out: Path) -> None:
    old, new = document.get("config", {}), config.to_dict()
    changed = [key for key in RESULT_KEYS if old.get(key) != new.get(key)]
    if changed:
        key = changed[0]
        raise LeantuneError(f"--resume: '{key}' was {old.get(key)!r} in the study in '{out}' and is {new[key]!r} now; "
                            "finished rows would not be comparable. Use the same settings, or a new --out")


def _remove_study(out: Path, document: dict[str, Any]) -> None:
    """Only what a study writes: its files, data/, one folder per model, the charts."""
    for model in document.get("config", {}).get("models", []):
        shutil.rmtree(out / model_folder_name(model), ignore_errors=True)
    shutil.rmtree(out / "data", ignore_errors=True)
    for path in [out / STUDY_FILE, *(out / name for name in REPORT_FILES), *out.glob("*.png")]:
        path.unlink(missing_ok=True)
