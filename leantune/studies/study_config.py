"""What `leantune study unit-tests` runs: models, methods, each method's training settings, the budget.

Each method trains with the paper's settings adapted to the model (Storhaug & Li: LoRA r=16, α=32,
dropout 0.1; (IA)³ at its defaults; prompt tuning with 20 randomly initialised virtual tokens) and
leantune's documented defaults for PaCA and SketchTune, at the learning rate that did best for it
in the method guide's grid on the demo job (README, "Which method"; LoRA's was found at r=8, α=16,
the same α/r scale). All methods share AdamW, a linear schedule with 10% warm-up, the data, the
sequence length and the batch size. A study YAML overrides any of it:

    models: [smollm2-135m]
    methods: [base, lora, prompt]
    epochs: 1
    methods_settings:
      lora: {lr: 1.0e-3, method: {r: 8, alpha: 16}}

`--quick` trades sample size for time (fewer functions, steps and mutants; no eval loss).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LeantuneError

BASE = "base"
PAPER_METHODS = ("base", "full", "lora", "ia3", "prompt", "paca", "sketchtune")
LABELS = {"base": "Base", "full": "Full fine-tuning", "lora": "LoRA", "ia3": "(IA)³", "prompt": "Prompt tuning",
          "paca": "PaCA", "sketchtune": "SketchTune"}

# method -> its training settings: the method mapping of `leantune train` and the learning rate.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"method": {"name": "full"}, "lr": 1e-4},
    "lora": {"method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.1}, "lr": 3e-3},
    "ia3": {"method": {"name": "ia3"}, "lr": 1e-2},
    "prompt": {"method": {"name": "prompt", "num_virtual_tokens": 20, "init": "random"}, "lr": 3.0},
    "paca": {"method": {"name": "paca", "r": 16, "alpha": 32}, "lr": 2e-3},
    "sketchtune": {"method": {"name": "sketchtune"}, "lr": 3e-4},
}

# What --quick changes: ~1 minute per method on a 2-core CPU instead of ~6.
QUICK = {"functions": 8, "max_steps": 5, "max_length": 256, "max_new_tokens": 96, "mutants": 10,
         "eval_loss": False, "sketch_fit": {"samples": 4, "seq_len": 256, "kmeans_iters": 2}}

# Keys whose change makes finished method runs incomparable with new ones (a resume refuses them).
RESULT_KEYS = ("models", "data", "split_seed", "test_fraction", "functions", "epochs", "max_steps", "max_length",
               "batch_size", "warmup", "schedule", "max_new_tokens", "chat_instruction", "mutants", "seed",
               "methods_settings", "sketch_fit", "eval_loss", "training")

CHAT_INSTRUCTION = ("Write one pytest unit test function named `{test_name}` for the Python function below. "
                    "The function `{name}` is already defined: call it directly and check its results with assert "
                    "statements. Reply with the test code only.")


def model_folder_name(model: str) -> str:
    """A model name as one folder of OUT (hub ids and paths hold slashes)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model)


@dataclass
class StudyConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    methods: list[str] = field(default_factory=lambda: list(PAPER_METHODS))
    data: str = "humaneval-tests"  # or a JSONL file of {"code", "test", "entry_point"} records
    split_seed: int = 0  # shuffles a JSONL file's records before its held-out share is cut off
    test_fraction: float = 0.25  # a JSONL file's held-out share (humaneval-tests has its fixed split)
    functions: int | None = None  # held-out functions used; None: all
    epochs: float = 1
    max_steps: int | None = None  # None: from epochs
    max_length: int = 512
    batch_size: int = 4
    schedule: str = "linear"
    warmup: float = 0.1
    max_new_tokens: int = 192
    generation_batch_size: int = 16
    chat_instruction: str = CHAT_INSTRUCTION
    mutants: int = 30  # per focal function
    eval_loss: bool = True  # held-out eval loss before and after training (adds ~20 s per method)
    seed: int = 0
    workers: int = 2  # sandbox processes at once
    sketch_fit: dict[str, Any] = field(default_factory=dict)  # SketchTune fit settings (samples, seq_len, ...)
    methods_settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method: lr, method, any train key
    training: dict[str, Any] = field(default_factory=dict)  # train keys for every method (threads, precision, ...)

    def validate(self) -> None:
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise LeantuneError(f"study: 'models' must be a non-empty list of model names, got {self.models!r}")
        unknown = [m for m in self.methods if m not in PAPER_METHODS]
        if unknown or not self.methods:
            raise LeantuneError(f"study: unknown method '{unknown[0] if unknown else ''}' in 'methods'; choose from "
                                f"{', '.join(PAPER_METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise LeantuneError(f"study: 'methods' lists a method twice: {self.methods}")
        for name, settings in self.methods_settings.items():
            if name not in METHOD_SETTINGS:
                raise LeantuneError(f"study: 'methods_settings' names '{name}', which is not a trained method "
                                    f"({', '.join(METHOD_SETTINGS)})")
            if not isinstance(settings, dict):
                raise LeantuneError(f"study: methods_settings.{name} must be a mapping of train keys")
        for key in ("functions", "max_steps"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise LeantuneError(f"study: '{key}' must be a positive integer or null, got {value!r}")
        if not 0 < self.test_fraction < 1:
            raise LeantuneError(f"study: 'test_fraction' must be between 0 and 1, got {self.test_fraction!r}")
        for key in ("max_new_tokens", "mutants", "batch_size", "max_length", "generation_batch_size", "workers"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LeantuneError(f"study: '{key}' must be a positive integer, got {value!r}")

    def train_document(self, model: str, method: str, out_dir: Path) -> dict[str, Any]:
        """The `leantune train` config of one method's run."""
        settings = copy.deepcopy(METHOD_SETTINGS[method])
        custom = copy.deepcopy(self.methods_settings.get(method, {}))
        settings["method"].update(custom.pop("method", {}))
        document = {"model": model, "max_length": self.max_length, "batch_size": self.batch_size,
                    "schedule": self.schedule, "warmup": self.warmup, "epochs": self.epochs,
                    "max_steps": self.max_steps, "seed": self.seed, "keep_checkpoints": 1,
                    # Ctrl-C still saves a checkpoint to resume from; periodic ones would put the writing of
                    # full fine-tuning's weights and optimizer state into its training time
                    "save_every": 0,
                    "unit_test_table": False, **copy.deepcopy(self.training), **settings, **custom,
                    "out_dir": str(out_dir)}
        return document

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def study_config(document: dict[str, Any] | None = None, quick: bool = False, **overrides: Any) -> StudyConfig:
    """A validated StudyConfig: defaults, then --quick, then the YAML document, then the command line."""
    values: dict[str, Any] = copy.deepcopy(QUICK) if quick else {}
    document = dict(document or {})
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    for key in document:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise LeantuneError(f"unknown study config key '{key}'{hint}; keys: {', '.join(sorted(known))}")
    values.update(document)
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = StudyConfig(**values)
    config.validate()
    return config
