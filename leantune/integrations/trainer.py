"""A model after `lt.attach` under `transformers.Trainer`: adapters saved at every checkpoint and at
the end, resumed from a checkpoint, and `save_model` writing the adapter instead of every weight.

- `LeantuneCallback` works with any Trainer: at each checkpoint it writes the leantune adapter
  (safetensors + JSON) into `checkpoint-N/adapter/`, and at the end of training into
  `OUTPUT_DIR/adapter/`. The Trainer's own checkpoint files stay as they are.
- `AdapterSaving` is a mixin for Trainer classes (`LeantuneTrainer` = it + `Trainer`): the
  checkpoints and `save_model()` hold only the adapter (`DIR/adapter/`, plus the tokenizer), never
  the base weights, and `train(resume_from_checkpoint=...)` loads the adapter's tensors back into
  the attached adapter (the optimizer, scheduler and RNG states come from the Trainer as usual).

Nothing here pickles: the adapter is safetensors and JSON; the Trainer's own optimizer and RNG
files are its business.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback

from .. import api
from ..adapters import read_adapter_config, save_adapter
from ..adapters.native import TENSOR_FILE, TRAINING_STATE_FILE, load_to_train, training_tensors
from ..errors import LeantuneError
from ..files import save_tensors

ADAPTER_DIR = "adapter"


def unwrapped_model(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and not api.attached(model):  # DDP / accelerate wrappers
        model = model.module
    return model


def load_trainer_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load the adapter saved in `folder/adapter/` into the adapter already attached to `model`."""
    path = Path(folder) / ADAPTER_DIR
    if not (path / TENSOR_FILE).is_file():
        raise LeantuneError(f"checkpoint '{folder}' holds no leantune adapter ({ADAPTER_DIR}/{TENSOR_FILE} is missing)")
    document = read_adapter_config(path)
    name = document.get("adapter_name", "default")
    registry = api.attached(model)
    if name not in registry:
        raise LeantuneError(f"checkpoint '{folder}' holds adapter '{name}', but the model has "
                            f"{', '.join(registry) or 'none'}; attach the same config before resuming")
    load_to_train(model, name, path, Path(folder) / TRAINING_STATE_FILE)


def save_training_state(model: nn.Module, folder: Path) -> None:
    """Beside a checkpoint's adapter, the tensors being trained where the adapter is saved folded."""
    tensors = training_tensors(model)
    if tensors:
        save_tensors(tensors, folder / TRAINING_STATE_FILE)


class LeantuneCallback(TrainerCallback):
    """Write the leantune adapter at every Trainer checkpoint and at the end of training."""

    def on_save(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_adapter(unwrapped_model(model), folder / ADAPTER_DIR)
            save_training_state(unwrapped_model(model), folder)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and state.is_world_process_zero:
            save_adapter(unwrapped_model(model), Path(args.output_dir) / ADAPTER_DIR)


class AdapterSaving:
    """Mixin for a Trainer class: its saves hold the adapter only; resuming loads it back."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        folder.mkdir(parents=True, exist_ok=True)
        save_adapter(unwrapped_model(self.model), folder / ADAPTER_DIR)
        save_training_state(unwrapped_model(self.model), folder)  # a checkpoint resumes exactly from it
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(folder))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_trainer_adapter(unwrapped_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best:
            load_trainer_adapter(unwrapped_model(self.model), best)


class LeantuneTrainer(AdapterSaving, Trainer):
    """`transformers.Trainer` whose checkpoints and `save_model()` hold the leantune adapter only."""
