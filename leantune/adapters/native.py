"""leantune's own adapter format: `adapter_config.json` (method, its fields, adapter name, base
model) and `adapter.safetensors`, written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..errors import LeantuneError
from ..files import atomic_directory, load_tensors, read_format_document, save_tensors
from ..methods.base import MethodConfig, config_from_dict

CONFIG_FILE = "adapter_config.json"
TENSOR_FILE = "adapter.safetensors"
FORMAT = "leantune-adapter"
FORMAT_VERSION = 1


def single_adapter_name(model: nn.Module, adapter_name: str | None) -> str:
    names = list(api.attached(model))
    if adapter_name is not None:
        if adapter_name not in names:
            raise LeantuneError(f"no adapter named '{adapter_name}' is attached (attached: {', '.join(names) or 'none'})")
        return adapter_name
    if len(names) != 1:
        raise LeantuneError(f"the model has {len(names)} adapters ({', '.join(names) or 'none'}); pass adapter_name=")
    return names[0]


def adapter_tensors(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors `save_adapter` writes for one adapter of `model`."""
    name = single_adapter_name(model, adapter_name)
    return api.attached(model)[name].state_dict(model, name)


TRAINING_STATE_FILE = "training_state.safetensors"


def training_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint needs besides the saved adapters to continue training exactly: the tensors
    being trained of every adapter whose saved form is folded (keyed 'ADAPTER::NAME'); often none."""
    tensors = {}
    for name, config in api.attached(model).items():
        for key, tensor in (config.training_state_dict(model, name) or {}).items():
            tensors[f"{name}::{key}"] = tensor.detach()
    return tensors


def load_training_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load what `training_tensors` wrote into the freshly attached adapters of `model`."""
    registry = api.attached(model)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, inner = key.partition("::")
        if name not in registry:
            raise LeantuneError(f"'{source}' holds training tensors of adapter '{name}', which is not attached")
        grouped.setdefault(name, {})[inner] = tensor
    for name, state in grouped.items():
        registry[name].load_training_state_dict(model, name, state)


def load_to_train(model: nn.Module, adapter_name: str, adapter_dir: Path, training_state: Path) -> None:
    """A checkpoint's tensors into the attached adapter: its training state where one was written
    (the adapter is saved folded), else the saved adapter itself."""
    if training_state.is_file():
        load_training_tensors(model, load_tensors(training_state), str(training_state))
    else:
        api.attached(model)[adapter_name].load_state_dict(model, adapter_name, load_tensors(adapter_dir / TENSOR_FILE))


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                 extra: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one adapter (config JSON + safetensors) atomically to directory `path`.

    `tensors`: the adapter's tensors already collected (made whole by a sharded run), else read here."""
    name = single_adapter_name(model, adapter_name)
    config = api.attached(model)[name]
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_name": name,
        "method": config.to_dict(),
        "base_model": _model_name(model),
        "base_model_type": _model_type(model),
        **(extra or {}),
    }
    with atomic_directory(path) as tmp:
        save_tensors(adapter_tensors(model, name) if tensors is None else tensors, tmp / TENSOR_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    return Path(path)


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    return read_format_document(path, CONFIG_FILE, FORMAT, FORMAT_VERSION, "adapter")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Attach the adapter saved in `path` to `model` (a fresh base model) and load its tensors."""
    document = read_adapter_config(path)
    _check_model_type(document, model, path)
    config: MethodConfig = config_from_dict(document["method"])
    name = adapter_name or document.get("adapter_name", "default")
    tensors = load_tensors(Path(path) / TENSOR_FILE)
    try:
        return attach_with_state(model, config, name, tensors)
    except LeantuneError as err:
        saved_on, this_model = document.get("base_model"), _model_name(model)
        if saved_on == this_model:
            raise
        # Name both models first. The advice after '; ' is for someone choosing a config (e.g.
        # bitfit's add_bias=True), not for someone loading a saved adapter, so it is left out.
        reason = str(err).split("; ")[0]
        raise LeantuneError(f"adapter '{path}' does not fit this model: it was saved on '{saved_on or 'an unnamed model'}', "
                            f"this model is '{this_model or type(model).__name__}' ({reason})") from None


def _model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _check_model_type(document: dict[str, Any], model: nn.Module, path: str | os.PathLike) -> None:
    """An adapter trained on another architecture can fit this one's shapes (a Llama adapter on a
    Qwen2 model of the same sizes) and would load without a word; the architecture is recorded
    (adapters saved before it was have none, and load as before)."""
    saved, this = document.get("base_model_type"), _model_type(model)
    if saved and this and saved != this:
        raise LeantuneError(f"adapter '{path}' was trained on a {saved} model ('{document.get('base_model')}'), and "
                            f"this model is {this} ('{_model_name(model)}'): its weights mean nothing here; load it "
                            f"onto the {saved} model it was trained on")


def attach_with_state(model: nn.Module, config: MethodConfig, adapter_name: str,
                      state: dict[str, torch.Tensor]) -> nn.Module:
    """Attach `config` and load its tensors; a tensor that does not fit leaves the model as it was."""
    api.attach(model, config.for_saved_tensors(), adapter_name)
    api.attached(model)[adapter_name] = config  # what was saved, not the cheap start it was built from
    try:
        config.load_state_dict(model, adapter_name, state)
    except LeantuneError:
        api.detach(model, adapter_name)
        raise
    return model
