"""The method protocol and the registry that maps method names to configs.

A method is a small dataclass (its config), of one of two kinds:
- a `ModuleMethod` replaces each targeted module with an `AdapterLayer` (methods/layer.py) that
  keeps the original as `base_layer`: LoRA, DoRA, PaCA, IA3, BitFit, SketchTune, Adapter;
- a `ModelMethod` acts on the model as a whole (its weights, inputs or forward): full fine-tuning.
Both answer the same calls (attach, detach, disabled, trainable parameters, state to save and
load), so the API and the contract test treat them alike.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..errors import LeantuneError
from ..quant import quantize_base
from .layer import AdapterLayer, adapter_layers, bare_module_name, model_router, named_adapter_layers
from .targets import linear_view, module_sharing_weight, replace_module, resolve_targets, weight_holders

METHODS: dict[str, type["MethodConfig"]] = {}


def register(cls: type["MethodConfig"]) -> type["MethodConfig"]:
    """Class decorator: make a method config reachable by its `method_name` (configs, saved adapters)."""
    METHODS[cls.method_name] = cls
    return cls


def method_class(name: str) -> type["MethodConfig"]:
    key = str(name).lower()
    if key not in METHODS:
        close = difflib.get_close_matches(key, METHODS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise LeantuneError(f"unknown method '{name}'{hint}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def config_from_dict(data: dict[str, Any]) -> "MethodConfig":
    """Build a method config from `{name: ..., **fields}` (YAML configs and saved adapters)."""
    if not isinstance(data, dict) or "name" not in data:
        raise LeantuneError("method must be a mapping with a 'name' key, e.g. {name: lora, r: 8}")
    fields = dict(data)
    cls = method_class(fields.pop("name"))
    return cls.from_dict(fields)


@dataclass
class MethodConfig:
    """What every method answers: validation, (de)serialisation, and what it does to a model."""

    method_name: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True  # whether lt.merge can fold the adapter into the base weights

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the fields; each method extends this with its own."""

    # -- validation helpers, shared by every method --------------------------------------
    def _require_int(self, key: str, minimum: int = 1) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise LeantuneError(f"{self.method_name}: '{key}' must be an integer >= {minimum}, got {value!r}")

    def _require_number(self, key: str, low: float | None = None, high: float | None = None,
                        low_open: bool = False) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LeantuneError(f"{self.method_name}: '{key}' must be a number, got {value!r}")
        if low is not None and (value < low or (low_open and value == low)):
            bound = f"> {low}" if low_open else f">= {low}"
            raise LeantuneError(f"{self.method_name}: '{key}' must be {bound}, got {value!r}")
        if high is not None and value > high:
            raise LeantuneError(f"{self.method_name}: '{key}' must be <= {high}, got {value!r}")

    def _require_choice(self, key: str, choices: tuple) -> None:
        value = getattr(self, key)
        if value not in choices:
            raise LeantuneError(f"{self.method_name}: '{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}")

    def _require_bool(self, key: str) -> None:
        if not isinstance(getattr(self, key), bool):
            raise LeantuneError(f"{self.method_name}: '{key}' must be true or false, got {getattr(self, key)!r}")

    def components(self) -> list["MethodConfig"]:
        """The single methods this config runs: itself (a hybrid: its parts)."""
        return [self]

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"name": self.method_name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in fields:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise LeantuneError(
                    f"{cls.method_name}: unknown key '{key}'{hint}; valid keys: {', '.join(sorted(known))}")
        return cls(**fields)

    # -- what a method does to a model ---------------------------------------------------
    def attach_to_model(self, model: nn.Module, adapter_name: str) -> list[str]:
        """Adapt `model` in place; return the names of the modules touched."""
        raise NotImplementedError

    def for_saved_tensors(self) -> "MethodConfig":
        """The config to attach when saved tensors are about to replace every initial value.

        Methods whose start is costly (a forward pass, a tokenizer) return themselves with a cheap
        start; the shapes stay the same, and the caller records the original config."""
        return self

    def detach_from_model(self, model: nn.Module, adapter_name: str) -> None:
        """Undo what `attach_to_model` did beyond adapter layers (which the API unwraps)."""

    def set_disabled(self, model: nn.Module, adapter_name: str, disabled: bool) -> None:
        """Model methods switch themselves off and on here; adapter layers follow the router."""

    def trainable_parameters(self, model: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors `save_adapter` writes: everything needed to rebuild the adapter on a fresh base."""
        raise NotImplementedError

    def load_state_dict(self, model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Load tensors written by `state_dict`; every missing, extra or mis-shaped tensor is an error."""
        _copy_checked(self.state_dict(model, adapter_name), state)

    def training_state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor] | None:
        """The tensors being trained, where `state_dict` saves something else (a folded form), so a
        checkpoint can continue training exactly; None: the saved adapter is what trains."""
        return None

    def load_training_state_dict(self, model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Load tensors written by `training_state_dict` into a freshly attached adapter."""
        _copy_checked(self.training_state_dict(model, adapter_name) or {}, state)


@dataclass(kw_only=True)
class ModuleMethod(MethodConfig):
    """A method that wraps targeted modules; these fields say which.

    They are keyword-only, so a method's own fields come first: `LoRA(8, 16)` is r=8, alpha=16.
    """

    # Module types a method can wrap; `targets.resolve_targets` rejects anything else by name.
    target_types: ClassVar[tuple[type, ...]] = (nn.Linear,)

    targets: str | list[str] = "all-linear"
    exclude: list[str] = field(default_factory=list)
    layers: list[int] | None = None

    def validate(self) -> None:
        if not isinstance(self.targets, (str, list, tuple)) or not self.targets:
            raise LeantuneError(f"{self.method_name}: 'targets' must be 'all-linear', a regex, or a list of module names")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if self.layers is not None and (
            not isinstance(self.layers, (list, tuple)) or not all(isinstance(i, int) for i in self.layers)
        ):
            raise LeantuneError(f"{self.method_name}: 'layers' must be a list of layer indices, got {self.layers!r}")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise LeantuneError(f"{self.method_name}: 'layers' counts blocks from 0 (the first), got {self.layers!r}")

    def wrap(self, name: str, module: nn.Module, adapter_name: str) -> AdapterLayer:
        """Return the adapter layer that replaces `module` (named `name` in the model)."""
        raise NotImplementedError

    def chosen_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The (name, module) pairs to wrap; methods narrow or check the resolved targets here."""
        return resolve_targets(model, self)

    def check_target(self, name: str, module: nn.Module) -> None:
        """Refuse a target this config cannot adapt (sizes beyond the layer's), naming it; before any wrap."""

    @property
    def writes_base_weight(self) -> bool:
        """Whether attaching or training writes into a target's own weight (PaCA's columns, PiSSA's residual)."""
        return False

    def attach_to_model(self, model: nn.Module, adapter_name: str) -> list[str]:
        """Replace every targeted module with its adapter layer; return the names touched."""
        chosen = [(name, linear_view(module)) for name, module in self.chosen_targets(model)]  # Conv1D as Linear
        holders = weight_holders(model) if self.writes_base_weight else None
        for name, module in chosen:  # check every target before touching any
            self.check_target(name, module)
            holder = module_sharing_weight(model, module, holders) if holders is not None else None
            if holder is not None:
                raise LeantuneError(f"{self.method_name} writes into the weight of '{name}', which '{holder}' shares "
                                    "(tied input and output embeddings): it would change that module too; leave "
                                    f"'{name}' out of the targets")
        for name, module in chosen:
            module = quantize_base(name, module, getattr(self, "quantize", None))  # QLoRA, QDoRA, QPaCA
            replace_module(model, name, self.wrap(name, module, adapter_name))
        return [name for name, _ in chosen]

    def trainable_parameters(self, model: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
        for layer in adapter_layers(model, adapter_name):
            yield from layer.adapter_parameters()

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        state = {}  # keyed by names on the bare model, so an adapter under another one loads on a fresh base
        for module_name, layer in named_adapter_layers(model, adapter_name):
            for key, tensor in layer.adapter_state_dict().items():
                state[f"{bare_module_name(module_name)}.{key}"] = tensor
        return state

    def load_state_dict(self, model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(model, adapter_name, state)
        for _, layer in named_adapter_layers(model, adapter_name):
            layer.adapter_state_loaded()
        model_router(model).layout += 1  # new tensors: stacked row forms are rebuilt even under trust_versions


@dataclass
class ModelMethod(MethodConfig):
    """A method that acts on the model as a whole: its weights, its inputs or its forward."""


def _copy_checked(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the `expected` tensors; every missing, extra or mis-shaped tensor is an error."""
    _check_state_keys(expected, state)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(target.dtype))


def _check_state_keys(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise LeantuneError(f"adapter file lacks tensor '{missing[0]}' ({len(missing)} missing): it was saved for another model or method")
    if extra:
        raise LeantuneError(f"adapter file has tensor '{extra[0]}' that this model has no place for ({len(extra)} unexpected)")
    for key, target in expected.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise LeantuneError(
                f"adapter tensor '{key}' has shape {tuple(state[key].shape)}, the model expects {tuple(target.shape)}")


