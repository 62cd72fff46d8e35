"""The main job as a recipe: train (`training`), then, when the config asks for it, the
before/after unit-test study (`studies.unit_tests`). `lt.train` and `leantune train` run this."""
from __future__ import annotations

from typing import Any

from .studies.unit_tests import run_after_training, study_records
from .training.config import TrainConfig, as_config
from .training.loop import TrainResult, run_training


def train(config: TrainConfig | dict | str, resume: bool = False, overwrite: bool = False,
          model: Any = None, tokenizer: Any = None, command: list[str] | None = None) -> TrainResult:
    """Run the training job described by `config` (a TrainConfig, a mapping, or a YAML path).

    `resume` continues the run in out_dir from its latest checkpoint; `overwrite` replaces the
    results of an earlier run. `model` / `tokenizer` train an already loaded model (then
    `config.model` only names it in saved files). `command` is the command line that rebuilds
    this config (without out_dir); the Ctrl-C message extends it into the resume command. With
    `unit_test_table: true` the finished run's base and tuned model each write a unit test per
    held-out function (summary["unit_tests"], out_dir/unit_tests.json).
    """
    config = as_config(config)
    if config.unit_test_table:
        study_records(config)  # a study that cannot run fails before training, not after it
    result = run_training(config, resume=resume, overwrite=overwrite, model=model, tokenizer=tokenizer,
                          command=command)
    if config.unit_test_table and result.model is not None and not result.interrupted:
        result.summary["unit_tests"] = run_after_training(result, config)
    return result
