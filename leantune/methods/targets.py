"""Which modules a method config touches: "all-linear", name suffixes, or a regex.

Every named target must match something; a miss is an error that names the target and the
closest module names, even when other targets did match.
"""
from __future__ import annotations

import difflib
import re
from typing import ClassVar, Protocol

import torch
from torch import nn

from ..errors import LeantuneError
from .layer import AdapterLayer

ALL_LINEAR = "all-linear"
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


class TargetSelection(Protocol):
    """What `resolve_targets` reads of a method config (methods.base.ModuleMethod has it all)."""

    method_name: ClassVar[str]
    target_types: ClassVar[tuple[type, ...]]
    targets: str | list[str]
    exclude: list[str]
    layers: list[int] | None


# -- GPT-2's Conv1D: a linear layer whose weight is stored [in, out] (PEFT's fan_in_fan_out) ------

def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 and its kin): y = x W + b with W of shape [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class LinearFromConv1D(nn.Linear):
    """A Conv1D turned into the nn.Linear every method wraps (weight transposed to [out, in]);
    `detach` turns it back (`to_conv1d`), so the model saves in its own layout."""

    def __init__(self, conv: nn.Module):
        weight = conv.weight
        super().__init__(weight.shape[0], weight.shape[1], bias=conv.bias is not None, device=weight.device,
                         dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight.t())
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.weight.requires_grad_(weight.requires_grad)
        if conv.bias is not None:
            self.bias.requires_grad_(conv.bias.requires_grad)
        self.conv1d_type = type(conv)

    def to_conv1d(self) -> nn.Module:
        conv = self.conv1d_type(self.out_features, self.in_features)
        conv.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight.t())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
            else:
                conv.bias = None
        conv.weight.requires_grad_(self.weight.requires_grad)
        return conv


def linear_view(module: nn.Module) -> nn.Module:
    """What a method wraps: the module itself, or a Conv1D as a LinearFromConv1D."""
    return LinearFromConv1D(module) if is_conv1d(module) else module


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection(s), which "all-linear" leaves alone."""
    names = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.split(".")[-1] in ("lm_head", "score", "classifier"):
            names.add(name)
    return names


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules a method may wrap: adapter layers stand for what they wrap; their insides are hidden,
    and so are the modules model methods add to hold their own tensors (`adapter_owned = True`)."""
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            if getattr(child, "adapter_owned", False):
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            found.append((name, child))
            if not isinstance(child, AdapterLayer):
                visit(name, child)

    visit("", model)
    return found


def unwrap(module: nn.Module) -> nn.Module:
    return module.base_module() if isinstance(module, AdapterLayer) else module


def layer_index(name: str) -> int | None:
    """The block index in names like 'model.layers.3.mlp.up_proj' (first integer component)."""
    match = _LAYER_INDEX.search(f".{name}")
    return int(match.group(1)) if match else None


def _matches_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def resolve_targets(model: nn.Module, config: TargetSelection) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs `config` touches, in model order; errors if a target matches nothing."""
    modules = candidate_modules(model)
    targets, kinds = config.targets, config.target_types
    if isinstance(targets, str) and targets == ALL_LINEAR:
        heads = output_head_names(model)
        chosen = [(n, m) for n, m in modules if _is_linear(unwrap(m)) and n not in heads]
        if not chosen:
            adapted = next((m for _, m in modules if isinstance(m, AdapterLayer)), None)
            if adapted is not None:  # e.g. every linear is sketched or NF4 under another adapter
                raise LeantuneError(f"{config.method_name}: targets 'all-linear' found no plain linear: the linears "
                                    f"carry a {adapted.method_name} adapter whose base {config.method_name} cannot "
                                    "wrap; stack it on a plain or unquantized base instead")
            raise LeantuneError("targets 'all-linear' matched no nn.Linear (or Conv1D) module in this model")
    elif isinstance(targets, str):
        chosen = _by_regex(modules, targets)
    else:
        chosen = _by_suffixes(modules, targets)
    chosen = [(n, m) for n, m in chosen if not any(_matches_suffix(n, e) or re.fullmatch(e, n) for e in config.exclude)]
    if config.layers is not None:
        wanted = set(config.layers)
        present = {layer_index(n) for n, _ in chosen}
        missing = sorted(wanted - present)
        if missing and chosen:  # a layer beyond the model, or without a target, is a mistake, not a no-op
            blocks = sorted(i for i in present if i is not None)
            raise LeantuneError(f"{config.method_name}: 'layers' names block(s) {missing} where the targets match no "
                                f"module (they match blocks {blocks[0]}-{blocks[-1]})" if blocks else
                                f"{config.method_name}: 'layers' names block(s) {missing}, but the targets match no "
                                "module inside a numbered block")
        chosen = [(n, m) for n, m in chosen if layer_index(n) in wanted]
    if not chosen:
        raise LeantuneError(f"{config.method_name}: targets {targets!r} with exclude/layers filters leave no module to adapt")
    for name, module in chosen:
        if is_conv1d(module) and nn.Linear in kinds:
            continue  # wrapped as a LinearFromConv1D (ModuleMethod.attach_to_model)
        if not isinstance(unwrap(module), kinds) and isinstance(module, AdapterLayer):
            raise LeantuneError(f"{config.method_name}: target '{name}' carries a {module.method_name} adapter whose "
                                f"base {config.method_name} cannot wrap; stack it on a plain or unquantized base instead")
        if not isinstance(unwrap(module), kinds):
            allowed = ", ".join(k.__name__ for k in kinds)
            raise LeantuneError(
                f"{config.method_name}: target '{name}' is a {type(unwrap(module)).__name__}, this method adapts only {allowed}")
    return chosen


def _by_regex(modules: list[tuple[str, nn.Module]], pattern: str) -> list[tuple[str, nn.Module]]:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise LeantuneError(f"targets regex {pattern!r} is invalid: {err}") from None
    chosen = [(n, m) for n, m in modules if regex.fullmatch(n)]
    if not chosen:
        raise LeantuneError(f"targets regex {pattern!r} matches no module name; {closest_names(modules, pattern)}")
    return chosen


def _by_suffixes(modules: list[tuple[str, nn.Module]], suffixes: list[str]) -> list[tuple[str, nn.Module]]:
    for suffix in suffixes:
        if not isinstance(suffix, str) or not suffix:
            raise LeantuneError(f"targets must be module names, got {suffix!r}")
        if not any(_matches_suffix(n, suffix) for n, _ in modules):
            raise LeantuneError(f"target '{suffix}' matches no module; {closest_names(modules, suffix)}")
    return [(n, m) for n, m in modules if any(_matches_suffix(n, s) for s in suffixes)]


def closest_names(modules: list[tuple[str, nn.Module]], wanted: str) -> str:
    short_names = sorted({n.split(".")[-1] for n, _ in modules})
    close = difflib.get_close_matches(wanted.split(".")[-1], short_names, n=3, cutoff=0.4)
    if close:
        return "closest module names: " + ", ".join(close)
    return "module names include: " + ", ".join(short_names[:8])


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def weight_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id of each parameter -> the (name, module) pairs that hold it directly, adapter layers left
    out: one walk over the model, for `module_sharing_weight` asked about many targets."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, AdapterLayer):
            for parameter in module.parameters(recurse=False):
                holders.setdefault(id(parameter), []).append((name, module))
    return holders


def module_sharing_weight(model: nn.Module, base: nn.Module,
                          holders: dict[int, list[tuple[str, nn.Module]]] | None = None) -> str | None:
    """The name of another module of `model` that holds `base`'s weight (tied input and output
    embeddings), if any; the adapter layers around `base` and the modules inside it do not count.
    `holders` (from `weight_holders`) saves the walk over the model when asking about many."""
    weight = getattr(base, "weight", None)
    if weight is None:
        return None
    inside = {id(module) for module in base.modules()}  # an adapter layer's own base_layer is not another module
    for name, module in (holders if holders is not None else weight_holders(model)).get(id(weight), []):
        if id(module) not in inside:
            return name
    return None
