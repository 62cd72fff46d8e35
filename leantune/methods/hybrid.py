"""A hybrid adapter: several method configs on disjoint targets, trained, saved and loaded as one.

The survey's hybrid family, e.g. the MAM adapter: `lt.attach(model, [lt.PrefixTuning(...),
lt.Adapter(placement="parallel", where="ffn")])`. Part i is attached under the name
"ADAPTER/i", so its layers and state stay its own; the router treats every part as the adapter
they belong to, so `lt.disabled`, `lt.use` and detach act on the whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..errors import LeantuneError
from .base import MethodConfig, ModelMethod, config_from_dict, register
from .layer import PART_SEPARATOR, named_adapter_layers
from .targets import replace_module


@register
@dataclass
class Hybrid(ModelMethod):
    method_name: ClassVar[str] = "hybrid"

    parts: list[MethodConfig] = field(default_factory=list)

    def validate(self) -> None:
        self.parts = [config_from_dict(part) if isinstance(part, dict) else part for part in self.parts]
        if len(self.parts) < 2:
            raise LeantuneError("hybrid: 'parts' must list at least two method configs")
        for part in self.parts:
            if not isinstance(part, MethodConfig) or isinstance(part, Hybrid):
                raise LeantuneError(f"hybrid: each part must be a method config (not a hybrid), got {part!r}")

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return all(part.mergeable for part in self.parts)

    def for_saved_tensors(self) -> MethodConfig:
        return replace(self, parts=[part.for_saved_tensors() for part in self.parts])

    def components(self) -> list[MethodConfig]:
        return list(self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.method_name, "parts": [part.to_dict() for part in self.parts]}

    def part_names(self, adapter_name: str) -> list[str]:
        return [f"{adapter_name}{PART_SEPARATOR}{i}" for i in range(len(self.parts))]

    def attach_to_model(self, model: nn.Module, adapter_name: str) -> list[str]:
        touched: dict[str, int] = {}
        attached: list[tuple[MethodConfig, str]] = []
        try:
            for i, (part, name) in enumerate(zip(self.parts, self.part_names(adapter_name))):
                names = part.attach_to_model(model, name)
                attached.append((part, name))
                overlap = sorted(set(names) & set(touched))
                if overlap:
                    raise LeantuneError(f"hybrid: parts {touched[overlap[0]]} and {i} both adapt '{overlap[0]}'; "
                                        "the parts of a hybrid adapter need disjoint targets")
                touched.update(dict.fromkeys(names, i))
        except LeantuneError:
            for part, name in reversed(attached):
                _undo_part(model, part, name)
            raise
        return list(touched)

    def detach_from_model(self, model: nn.Module, adapter_name: str) -> None:
        for part, name in zip(self.parts, self.part_names(adapter_name)):
            part.detach_from_model(model, name)

    def set_disabled(self, model: nn.Module, adapter_name: str, disabled: bool) -> None:
        for part, name in zip(self.parts, self.part_names(adapter_name)):
            part.set_disabled(model, name, disabled)

    def trainable_parameters(self, model: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
        for part, name in zip(self.parts, self.part_names(adapter_name)):
            yield from part.trainable_parameters(model, name)

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """Each part's tensors under its index: "0.<key>", "1.<key>"."""
        state = {}
        for i, (part, name) in enumerate(zip(self.parts, self.part_names(adapter_name))):
            state.update({f"{i}.{key}": tensor for key, tensor in part.state_dict(model, name).items()})
        return state

    def load_state_dict(self, model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        unknown = sorted(key for key in state if key.partition(".")[0] not in map(str, range(len(self.parts))))
        if unknown:
            raise LeantuneError(f"adapter file has tensor '{unknown[0]}' that this hybrid adapter has no part for")
        for i, (part, name) in enumerate(zip(self.parts, self.part_names(adapter_name))):
            part.load_state_dict(model, name, _part_state(state, i))


    def training_state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor] | None:
        """Where a part saves a folded form: every part's tensors being trained, under its index."""
        parts = list(zip(self.parts, self.part_names(adapter_name)))
        training = [part.training_state_dict(model, name) for part, name in parts]
        if all(state is None for state in training):
            return None
        return {f"{i}.{key}": tensor for i, ((part, name), state) in enumerate(zip(parts, training))
                for key, tensor in (part.state_dict(model, name) if state is None else state).items()}

    def load_training_state_dict(self, model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        for i, (part, name) in enumerate(zip(self.parts, self.part_names(adapter_name))):
            own = _part_state(state, i)
            if part.training_state_dict(model, name) is None:
                part.load_state_dict(model, name, own)
            else:
                part.load_training_state_dict(model, name, own)


def _part_state(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Part `index`'s tensors of a hybrid's state, without their "index." prefix."""
    prefix = f"{index}."
    return {key[len(prefix):]: tensor for key, tensor in state.items() if key.startswith(prefix)}


def _undo_part(model: nn.Module, part: MethodConfig, name: str) -> None:
    """Remove one attached part again (a later part failed): unwrap its layers, undo the rest."""
    for module_name, layer in reversed(list(named_adapter_layers(model, name))):
        layer.release()
        replace_module(model, module_name, layer.base_layer)
    part.detach_from_model(model, name)
