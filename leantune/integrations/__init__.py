"""leantune inside the usual stack: `transformers.Trainer` and TRL's `SFTTrainer` (docs/integrations.md)."""
from __future__ import annotations

from typing import Any

from .trainer import ADAPTER_DIR, AdapterSaving, LeantuneCallback, LeantuneTrainer, load_trainer_adapter

__all__ = ["ADAPTER_DIR", "AdapterSaving", "LeantuneCallback", "LeantuneTrainer", "LeantuneSFTTrainer",
           "load_trainer_adapter"]


def __getattr__(name: str) -> Any:
    if name == "LeantuneSFTTrainer":
        # TRL is optional: imported on first use of the name
        from .trl import LeantuneSFTTrainer
        return LeantuneSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
