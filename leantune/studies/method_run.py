"""One row of the study in its own process: train a method (or not, for the base row), then write
a test per held-out function, judge it and measure it; the row goes to `DIR/result.json`.

A fresh process per row keeps the rows' costs apart: peak memory is the process's peak resident set
(on CPU it only ever grows, so two methods in one process would share the first one's peak) and
no method inherits another's allocator state or threads. SketchTune's sketch is fitted in a process
of its own too (`fit-sketch`), so that fitting's memory is not charged to training the tables.

    python -m leantune.studies.method_run SPEC.json

SPEC: {"job": "row" | "fit-sketch", "model", "method", "dir", "study" (StudyConfig.to_dict()),
"train_source", "eval_source", "held_out" (a JSON file of records), "sketch" (directory), "progress"}.
Exit status 130 when Ctrl-C stopped it (a training checkpoint is kept for the resume).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .. import api
from ..adapters import load_adapter
from ..errors import LeantuneError
from ..files import atomic_write_text
from ..methods.sketch import SketchTune
from ..methods.sketch.pack import save_sketch
from ..models import load_model, load_tokenizer
from ..training.config import build_config
from ..training.loop import run_training
from . import metrics
from .chat_base import chat_prompts, extract_chat_test, has_chat_template
from .study_config import BASE, StudyConfig
from .unit_tests import generate_and_judge

EXIT_INTERRUPTED = 130
RESULT_FILE = "result.json"
TRAIN_KEYS = ("steps", "time_s", "tokens", "tokens_per_s", "peak_memory_bytes", "eval_loss_before",
              "eval_loss_after", "final_loss", "train_examples")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    try:
        if spec["job"] == "fit-sketch":
            fit_study_sketch(spec)
            return 0
        return run_row(spec)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except LeantuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def fit_study_sketch(spec: dict[str, Any]) -> None:
    study = StudyConfig(**spec["study"])
    model, tokenizer = load_model(spec["model"]), load_tokenizer(spec["model"])
    config = SketchTune(**study.sketch_fit)
    started = time.perf_counter()
    sketch, report = config.fit(model, tokenizer)
    report["study_fit_seconds"] = time.perf_counter() - started
    save_sketch(sketch, spec["sketch"], report)


def run_row(spec: dict[str, Any]) -> int:
    study = StudyConfig(**spec["study"])
    records = json.loads(Path(spec["held_out"]).read_text())
    folder = Path(spec["dir"])
    row: dict[str, Any] = {"model": spec["model"], "method": spec["method"]}
    if spec["method"] == BASE:
        model, tokenizer = load_model(spec["model"]), load_tokenizer(spec["model"])
        info = api.summary(model)
        row.update(trainable=0, total=info["total"], settings=None, train=None)
    else:
        trained = train_method(spec, study, folder / "run")
        if trained is None:
            return EXIT_INTERRUPTED
        model, tokenizer, row["settings"], row["train"] = trained
        info = api.summary(model)
        # the share is of the base model's parameters: an adapter adds some, a sketch turns weights into codes
        row.update(trainable=sum(a["trainable"] for a in info["adapters"].values()),
                   total=sum(p.numel() for p in load_model(spec["model"]).parameters()))
    row["variants"] = write_tests(model, tokenizer, records, study, spec["method"], spec.get("progress", True))
    atomic_write_text(folder / RESULT_FILE, json.dumps(row, indent=1, default=str) + "\n")
    return 0


def train_method(spec: dict[str, Any], study: StudyConfig, run_dir: Path):
    """(model, tokenizer, train config as run, training summary), or None when Ctrl-C stopped it."""
    document = study.train_document(spec["model"], spec["method"], run_dir)
    document["data"] = {"train": spec["train_source"], "eval": spec["eval_source"] if study.eval_loss else None}
    document["progress"] = spec.get("progress", True)
    if spec["method"] == "sketchtune":
        document["method"]["sketch"] = spec["sketch"]
    config = build_config(document)
    result = run_training(config, resume=(run_dir / "config.yaml").is_file())
    if result.interrupted:
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    model, tokenizer = result.model, result.tokenizer
    if model is None:  # the run had finished before: its saved adapter is the trained model
        model, tokenizer = load_model(spec["model"]), load_tokenizer(spec["model"])
        load_adapter(model, result.adapter_dir)
    return model, tokenizer, document, {k: summary.get(k) for k in TRAIN_KEYS}


def write_tests(model: Any, tokenizer: Any, records: list[dict[str, Any]], study: StudyConfig, method: str,
                progress: bool) -> dict[str, Any]:
    """Per way of asking: the generated tests judged and measured. Every method continues the
    training prompt; the base model is also asked through its chat template (chat_base)."""
    model.eval()
    options = dict(max_new_tokens=study.max_new_tokens, batch_size=study.generation_batch_size, temperature=0.0,
                   top_p=1.0, limits=None, workers=study.workers, progress=progress)
    variants = {"prompt": generate_and_judge(model, tokenizer, records, method, **options)}
    if method == BASE and has_chat_template(tokenizer):
        # a chat reply opens with a sentence or a fence before the code: a larger budget, no stop strings
        variants["chat"] = generate_and_judge(
            model, tokenizer, records, "base, chat template", **{**options, "max_new_tokens": study.max_new_tokens + 64},
            prompts=chat_prompts(tokenizer, records, study.chat_instruction), extract=extract_chat_test, stop=(),
            special_tokens=False)
    for name, variant in variants.items():
        started = time.perf_counter()
        variant["rows"] = metrics.evaluate(records, variant["rows"], cap=study.mutants, workers=study.workers,
                                           progress=progress)
        variant["metrics_seconds"] = time.perf_counter() - started
    return variants


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
