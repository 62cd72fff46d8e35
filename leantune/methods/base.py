"""The protocol every method follows, and the registry that maps method names to configs.

A method is a small dataclass (its config). Most methods replace targeted modules with an
`AdapterLayer` that keeps the original module as `base_layer`; a few (full fine-tuning, prompt
tuning) act on the whole model instead and override `attach_to_model` / `state_dict`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..errors import LeantuneError

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


@dataclass(kw_only=True)
class MethodConfig:
    """Fields every module-wrapping method shares: which modules it touches.

    They are keyword-only, so a method's own fields come first: `LoRA(8, 16)` is r=8, alpha=16.
    """

    method_name: ClassVar[str] = ""
    # Module types a method can wrap; `targets.resolve_targets` rejects anything else by name.
    target_types: ClassVar[tuple[type, ...]] = (nn.Linear,)

    targets: str | list[str] = "all-linear"
    exclude: list[str] = field(default_factory=list)
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- validation helpers, shared by every method --------------------------------------
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
    def wrap(self, name: str, module: nn.Module, adapter_name: str) -> "AdapterLayer":
        """Return the adapter layer that replaces `module` (named `name` in the model)."""
        raise NotImplementedError

    def attach_to_model(self, model: nn.Module, adapter_name: str) -> list[str]:
        """Replace every targeted module with its adapter layer; return the names touched."""
        from ..quant import quantize_base
        from ..targets import replace_module, resolve_targets  # targets imports this module

        chosen = resolve_targets(model, self)
        for name, module in chosen:  # check every target before touching any
            self.check_target(name, module)
        names = []
        for name, module in chosen:
            module = quantize_base(name, module, getattr(self, "quantize", None))  # QLoRA, QDoRA, QPaCA
            replace_module(model, name, self.wrap(name, module, adapter_name))
            names.append(name)
        return names

    def check_target(self, name: str, module: nn.Module) -> None:
        """Refuse a target this config cannot adapt (sizes beyond the layer's), naming it; before any wrap."""

    def detach_from_model(self, model: nn.Module, adapter_name: str) -> None:
        """Undo `attach_to_model` (adapter layers are unwrapped by the API; nothing else by default)."""

    def set_disabled(self, model: nn.Module, adapter_name: str, disabled: bool) -> None:
        """Model-level methods switch themselves off here; adapter layers are handled by the API."""

    def trainable_parameters(self, model: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
        for layer in adapter_layers(model, adapter_name):
            yield from layer.adapter_parameters()

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors `save_adapter` writes: everything needed to rebuild the adapter on a fresh base."""
        state = {}
        for module_name, layer in named_adapter_layers(model, adapter_name):
            for key, tensor in layer.adapter_state_dict().items():
                state[f"{module_name}.{key}"] = tensor
        return state

    def load_state_dict(self, model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        """Load tensors written by `state_dict`; every missing, extra or mis-shaped tensor is an error."""
        expected = self.state_dict(model, adapter_name)
        _check_state_keys(expected, state)
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(state[key].to(target.dtype))
        for _, layer in named_adapter_layers(model, adapter_name):
            layer.adapter_state_loaded()


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


class AdapterLayer(nn.Module):
    """Wraps one module of the base model.

    Subclasses implement `adapted_forward` and, if they can be merged, `merge_into_base` plus
    `merged_base_tensors` (names of base_layer tensors that merging changes). Unmerge restores a
    stored copy of exactly those tensors, so it never drifts.
    """

    method_name: ClassVar[str] = ""  # the config's name, for messages (users know methods, not layer classes)

    def __init__(self, base_layer: nn.Module, adapter_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_name = adapter_name
        self.merged = False
        self.disabled = False
        self._merge_backup: dict[str, torch.Tensor] = {}

    # Module attributes code often reads (in_features, weight...) come from the wrapped module.
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_module(self) -> nn.Module:
        """The innermost original module (adapters may be stacked under different names)."""
        module = self.base_layer
        while isinstance(module, AdapterLayer):
            module = module.base_layer
        return module

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.disabled_forward(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def disabled_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Exactly the original module; layers that edit base weights in place override this."""
        return self.base_layer(x, *args, **kwargs)

    def release(self) -> None:
        """Called by `detach` (after unmerge) before the layer is unwrapped: undo in-place base edits."""

    # -- adapter tensors ------------------------------------------------------------------
    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        for name, param in self.named_parameters():
            if not name.startswith("base_layer."):
                yield param

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Own parameters and persistent buffers (never the base layer's)."""
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if not k.startswith("base_layer.")}

    def adapter_state_loaded(self) -> None:
        """Hook after `load_state_dict` (e.g. PaCA re-places its columns)."""

    def extra_repr(self) -> str:
        return f"adapter_name={self.adapter_name!r}, merged={self.merged}"

    # -- merge / unmerge ------------------------------------------------------------------
    merged_base_tensors: ClassVar[tuple[str, ...]] = ("weight",)

    def merge_into_base(self) -> None:
        raise LeantuneError(f"{self.method_name} adapters cannot be merged into the base weights")

    def merge(self) -> None:
        if self.merged:
            return
        base = self.base_module()
        self._merge_backup = {
            name: getattr(base, name).detach().clone() for name in self.merged_base_tensors
            if getattr(base, name, None) is not None
        }
        with torch.no_grad():
            self.merge_into_base()
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.base_module()
        with torch.no_grad():
            for name, saved in self._merge_backup.items():
                getattr(base, name).copy_(saved)
        self._merge_backup = {}
        self.merged = False


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 (float64 for float64 bases); half and quantized bases get float32."""
    return base_weight.dtype if base_weight.dtype in (torch.float32, torch.float64) else torch.float32


def autocast_active(x: torch.Tensor) -> bool:
    """Fused autograd functions assume one dtype throughout; under autocast layers take their plain path."""
    return torch.is_autocast_enabled(x.device.type)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run small CPU ops on one thread (PaCA's O(out × r) column writes, the sketch's column sweep):
    for ops this small a parallel region's hand-offs cost more than they buy, and far more when
    other processes hold the cores. Other devices are left alone."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a base linear as a dense tensor (quantized modules dequantize on demand)."""
    dequantize = getattr(module, "dequantize_weight", None)
    return dequantize() if callable(dequantize) else module.weight


def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """Merge `delta` into a base linear's weight (quantized modules dequantize, add and requantize)."""
    add = getattr(module, "add_to_weight_", None)
    if callable(add):
        add(delta)
    else:
        module.weight += delta.to(module.weight.dtype)


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite a base linear's weight with a dense tensor (quantized modules requantize it)."""
    quantize = getattr(module, "quantize_", None)
    if callable(quantize):
        quantize(weight)
    else:
        module.weight.copy_(weight.to(module.weight.dtype))


def adapter_layers(model: nn.Module, adapter_name: str | None = None) -> Iterator[AdapterLayer]:
    for _, layer in named_adapter_layers(model, adapter_name):
        yield layer


def named_adapter_layers(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, AdapterLayer]]:
    """Adapter layers in pre-order (an outer, later-attached layer comes before the one it wraps)."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and (adapter_name is None or module.adapter_name == adapter_name):
            yield name, module
