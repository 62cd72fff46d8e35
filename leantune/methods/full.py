"""Full fine-tuning: every parameter trains — the baseline every study compares against.

It acts on the whole model rather than wrapping modules. The saved "adapter" is the full set of
weights (each tied tensor once). Merging is a no-op: the weights being trained are the model's
own. For the same reason `lt.disabled` has no base model to run unless the config keeps a copy
of the starting weights (`keep_base=True`, which costs one extra set of weights); without it,
`disabled` raises. `detach` keeps the trained weights and drops the copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..errors import LeantuneError
from .base import ModelMethod, register

# Copies of the starting weights live in the model's __dict__: outside parameters and state_dict.
_BASE_COPY_ATTR = "leantune_full_base"


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer by state_dict name, each shared (tied) tensor once."""
    seen: set[int] = set()
    tensors = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[key] = tensor
    return tensors


@register
@dataclass
class Full(ModelMethod):
    method_name: ClassVar[str] = "full"

    keep_base: bool = False

    def validate(self) -> None:
        super().validate()
        self._require_bool("keep_base")

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "Full":
        # Full adapters saved before the module/model method split carry the targeting keys at
        # their defaults; they never selected anything for this method.
        legacy = {"targets": "all-linear", "exclude": [], "layers": None}
        return super().from_dict({k: v for k, v in fields.items() if legacy.get(k, object()) != v})

    def attach_to_model(self, model: nn.Module, adapter_name: str) -> list[str]:
        if self.keep_base:
            copies = {key: t.detach().clone() for key, t in model_tensors(model).items()}
            _base_copies(model)[adapter_name] = {"tensors": copies, "swapped": False}
        return []

    def detach_from_model(self, model: nn.Module, adapter_name: str) -> None:
        _base_copies(model).pop(adapter_name, None)

    def trainable_parameters(self, model: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
        yield from model.parameters()

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        return model_tensors(model)

    def set_disabled(self, model: nn.Module, adapter_name: str, disabled: bool) -> None:
        entry = _base_copies(model).get(adapter_name)
        if entry is None:
            if disabled:
                raise LeantuneError("full fine-tuning trains the model's own weights, so there is no separate base "
                                    "model to run; attach Full(keep_base=True) to keep a copy for lt.disabled")
            return
        if entry["swapped"] == disabled:
            return
        live = model_tensors(model)
        with torch.no_grad():
            for key, saved in entry["tensors"].items():
                live[key].data, entry["tensors"][key] = saved, live[key].data
        entry["swapped"] = disabled


def _base_copies(model: nn.Module) -> dict[str, dict[str, Any]]:
    return model.__dict__.setdefault(_BASE_COPY_ATTR, {})
