"""`lt.train(config)`: the fine-tuning job (config, data, AdamW loop, checkpoints/resume, summary).

`leantune.train` is both this package and the entry point: calling the module runs `train`, so
`lt.train(config)` works without a function shadowing the package (which would break
`import leantune.train.config` and friends).
"""
from __future__ import annotations

import sys
import types
from typing import Any

from .config import DataConfig, TrainConfig, build_config, documented_keys, load_config

__all__ = ["DataConfig", "TrainConfig", "build_config", "documented_keys", "load_config", "train"]


def train(config: Any, resume: bool = False, overwrite: bool = False, **kwargs: Any) -> Any:
    """Run the training job; see `leantune.train.loop.train`. Returns a TrainResult."""
    from .loop import train as run_training

    return run_training(config, resume=resume, overwrite=overwrite, **kwargs)


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
