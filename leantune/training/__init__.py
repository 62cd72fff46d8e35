"""The fine-tuning job (config, data, AdamW loop, checkpoints/resume, summary); `lt.train(config)` runs it.

Modules: `config` (the TrainConfig and its loading), `loop` (the job itself), `optim`,
`checkpoint` and `reporting`. `train` imports the loop (and torch-heavy code) only when called.
"""
from __future__ import annotations

from typing import Any

from .config import DataConfig, TrainConfig, build_config, documented_keys, load_config

__all__ = ["DataConfig", "TrainConfig", "build_config", "documented_keys", "load_config", "train"]


def train(config: Any, resume: bool = False, overwrite: bool = False, **kwargs: Any) -> Any:
    """Run the training job described by `config` (a TrainConfig, a mapping, or a YAML path).

    `resume` continues the run in out_dir from its latest checkpoint; `overwrite` replaces the
    results of an earlier run. Other keywords (`model`, `tokenizer`, `command`) go to
    `leantune.training.loop.train`. Returns a `TrainResult`.
    """
    from .loop import train as run_training

    return run_training(config, resume=resume, overwrite=overwrite, **kwargs)
