"""TRL's `SFTTrainer` with leantune's adapter saving (TRL is optional: `pip install trl`)."""
from __future__ import annotations

from trl import SFTTrainer

from .trainer import AdapterSaving


class LeantuneSFTTrainer(AdapterSaving, SFTTrainer):
    """`trl.SFTTrainer` whose checkpoints and `save_model()` hold the leantune adapter only."""
