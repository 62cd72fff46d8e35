"""TRL's `SFTTrainer` with leantune's adapter saving (TRL is optional: `pip install trl`)."""
from __future__ import annotations

from typing import Any

from trl import SFTTrainer

from ..loss import check_packed_rows_stay_apart
from .trainer import AdapterSaving, unwrapped_model


class LeantuneSFTTrainer(AdapterSaving, SFTTrainer):
    """`trl.SFTTrainer` whose checkpoints and `save_model()` hold the leantune adapter only.

    With `packing` or `padding_free`, TRL concatenates examples and restarts their position ids;
    the model with its adapter is first checked to keep such examples apart, as `leantune train`
    checks its own packing (prompt and prefix tuning, whose virtual tokens stand before a row only,
    are refused in one sentence)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.args, "packing", False) or getattr(self.args, "padding_free", False):
            check_packed_rows_stay_apart(unwrapped_model(self.model), "SFTConfig's packing / padding_free",
                                         "pass packing=False and padding_free=False")
