"""attach / detach / merge / unmerge / disabled / use / summary: the adapter API on any nn.Module."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

from .errors import LeantuneError
from .methods.base import MethodConfig
from .methods.layer import AdapterLayer, Router, adapter_layers, model_router, named_adapter_layers
from .methods.targets import replace_module

_REGISTRY_ATTR = "leantune_adapters"


def attached(model: nn.Module) -> dict[str, MethodConfig]:
    """The adapters on `model`, by adapter name, in the order they were attached."""
    return model.__dict__.setdefault(_REGISTRY_ATTR, {})


def attach(model: nn.Module, config: MethodConfig, adapter_name: str = "default") -> nn.Module:
    """Adapt `model` in place with `config`, freeze everything else, and return the model."""
    if not isinstance(config, MethodConfig):
        raise LeantuneError(f"attach expects a method config such as lt.LoRA(...), got {type(config).__name__}")
    registry = attached(model)
    if adapter_name in registry:
        raise LeantuneError(f"an adapter named '{adapter_name}' is already attached; detach it or choose another adapter_name")
    config.attach_to_model(model, adapter_name)
    registry[adapter_name] = config
    for layer in adapter_layers(model, adapter_name):  # new layers take the mode of what they wrap
        layer.train(layer.base_layer.training)
    bind_layers(model)
    chosen = router(model).selected
    if chosen is not None:  # a new adapter runs, next to what lt.use chose
        router(model).select([*chosen, adapter_name])
    refreeze(model)
    _refuse_per_row_routing(model)
    return model


_ROUTING_GUARD_ATTR = "leantune_routing_guard"


def _refuse_per_row_routing(model: nn.Module) -> None:
    """`adapter_names=` (one adapter per batch row) would otherwise vanish into a model's **kwargs
    and silently run the stacked adapters; until per-row routing exists, it is an error."""
    if _ROUTING_GUARD_ATTR in model.__dict__:
        return

    def refuse(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
        if "adapter_names" in kwargs:
            raise LeantuneError("adapter_names= (one adapter per batch row) is not supported yet; run one "
                                "adapter per call, choosing it with lt.disabled(model, name) around the others")
        return None

    model.__dict__[_ROUTING_GUARD_ATTR] = model.register_forward_pre_hook(refuse, with_kwargs=True)


def router(model: nn.Module) -> Router:
    """The model's router: which adapters its forwards run (methods/layer.py)."""
    return model_router(model)


def bind_layers(model: nn.Module) -> None:
    """Every adapter layer of `model` reads the model's router (after attach or a conversion)."""
    shared = router(model)
    for layer in adapter_layers(model):
        layer.router = shared


def refreeze(model: nn.Module) -> None:
    """Only adapter tensors train: freeze every parameter, then unfreeze each adapter's own."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name, config in attached(model).items():
        for param in config.trainable_parameters(model, name):
            param.requires_grad_(True)


def _names(model: nn.Module, adapter_name: str | None) -> list[str]:
    registry = attached(model)
    if adapter_name is None:
        return list(registry)
    if adapter_name not in registry:
        raise LeantuneError(f"no adapter named '{adapter_name}' is attached (attached: {', '.join(registry) or 'none'})")
    return [adapter_name]


def _layers_of(model: nn.Module, names: list[str]) -> list[AdapterLayer]:
    return [layer for layer in adapter_layers(model) if layer.adapter_name in names]


def refuse_unmergeable(model: nn.Module, names: list[str]) -> None:
    """Methods whose adapters are no weight update (`mergeable = False`) cannot be folded into the base."""
    for name in names:
        config = attached(model)[name]
        if not config.mergeable:
            raise LeantuneError(f"adapter '{name}' ({config.method_name}) cannot be merged into the base weights; "
                                "save it with lt.save_adapter or lt.export_peft instead")


def merge(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold adapters into the base weights; inner (earlier) adapters first."""
    names = _names(model, adapter_name)
    refuse_unmergeable(model, names)
    for layer in reversed(_layers_of(model, names)):
        layer.merge()
    return model


def unmerge(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Restore the exact base weights saved at merge time; outer (later) adapters first."""
    for layer in _layers_of(model, _names(model, adapter_name)):
        layer.unmerge()
    return model


def detach(model: nn.Module, adapter_name: str | None = None, keep_merged: bool = False) -> nn.Module:
    """Remove adapters and return the base model: exact base weights, or merged ones with keep_merged=True.

    A base quantized at attach time (quantize="nf4") stays an NF4 module: its float weights were
    not kept, which is what saved the memory. A sketched base becomes a dense nn.Linear of Ŵ.
    """
    names = _names(model, adapter_name)
    registry = attached(model)
    if keep_merged:
        merge(model, adapter_name)
    else:
        unmerge(model, adapter_name)
    for name in reversed(names):
        for module_name, layer in reversed(list(named_adapter_layers(model, name))):
            layer.release()
            replace_module(model, module_name, layer.base_layer)
        registry[name].detach_from_model(model, name)
        del registry[name]
        chosen = router(model).selected
        if chosen is not None:
            router(model).select(chosen - {name})
    if registry:
        refreeze(model)
    else:
        _unfreeze_all(model)
    return model


def _unfreeze_all(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(True)


@contextlib.contextmanager
def disabled(model: nn.Module, adapter_name: str | None = None) -> Iterator[nn.Module]:
    """Run the exact base model inside the block; merged adapters are unmerged for it and re-merged after.

    Blocks nest: an adapter an outer block already switched off is left to that block to restore."""
    routes = router(model)
    names = [name for name in _names(model, adapter_name) if routes.runs(name)]
    registry = attached(model)
    was_merged = [layer for layer in _layers_of(model, names) if layer.merged]
    off: list[str] = []
    switched: list[str] = []
    try:
        for layer in was_merged:
            layer.unmerge()
        for name in names:
            routes.switched_off.add(name)
            off.append(name)
            registry[name].set_disabled(model, name, True)
            switched.append(name)
        yield model
    finally:
        for name in switched:
            registry[name].set_disabled(model, name, False)
        routes.switched_off.difference_update(off)
        for layer in reversed(was_merged):
            layer.merge()


def use(model: nn.Module, adapter_names: str | list[str] | None) -> nn.Module:
    """Choose what a plain forward runs: one adapter, a list (stacked), or None for the base model.

    Until the first call every attached adapter runs, stacked in attach order; an adapter attached
    later runs too, next to the chosen ones. Left-out adapters must not be merged (their update
    would stay in the base weights)."""
    registry = attached(model)
    names = [] if adapter_names is None else [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for name in names:
        _names(model, name)  # an unknown name is an error that lists the attached ones
    routes = router(model)
    if routes.switched_off:
        raise LeantuneError("lt.use cannot change which adapters run inside an lt.disabled block")
    left_out = [name for name in registry if name not in names]
    merged = [layer.adapter_name for layer in _layers_of(model, left_out) if layer.merged]
    if merged:
        raise LeantuneError(f"adapter '{merged[0]}' is merged into the base weights; lt.unmerge it before "
                            "lt.use leaves it out")
    for name, config in registry.items():  # model methods switch themselves
        config.set_disabled(model, name, name not in names)
    routes.select(names)
    return model


def summary(model: nn.Module, print_table: bool = False) -> dict[str, Any]:
    """Trainable and total parameter counts, per adapter and overall."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_adapter = {}
    for name, config in attached(model).items():
        params = {id(p): p for p in config.trainable_parameters(model, name)}
        per_adapter[name] = {
            "method": config.method_name,
            "trainable": sum(p.numel() for p in params.values()),
            "modules": sum(1 for _ in named_adapter_layers(model, name)),
        }
    result = {
        "adapters": per_adapter,
        "trainable": trainable,
        "total": total,
        "fraction": trainable / total if total else 0.0,
        "base_weight_bytes": base_weight_bytes(model),
    }
    if print_table:
        print(format_summary(result))
    return result


def base_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the base weights of adapted modules, as stored and as fp32/fp16 would store them."""
    stored = fp32 = 0
    for layer in adapter_layers(model):
        if isinstance(layer.base_layer, AdapterLayer):
            continue  # counted once, at the innermost layer
        for tensor in (*layer.base_layer.parameters(), *layer.base_layer.buffers()):  # NF4 packs into a buffer
            stored += tensor.numel() * tensor.element_size()
        fp32 += 4 * layer.base_weight_numel() if hasattr(layer, "base_weight_numel") else 4 * _dense_numel(layer.base_layer)
    return {"stored": stored, "fp32": fp32, "fp16": fp32 // 2}


def _dense_numel(module: nn.Module) -> int:
    dense_numel = getattr(module, "dense_numel", None)  # quantized modules: the dense shape's count
    return dense_numel() if callable(dense_numel) else sum(p.numel() for p in module.parameters())


def format_summary(result: dict[str, Any]) -> str:
    rows = [("adapter", "method", "modules", "trainable")]
    for name, info in result["adapters"].items():
        rows.append((name, info["method"], str(info["modules"]), f"{info['trainable']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(f"trainable {result['trainable']:,} of {result['total']:,} parameters "
                 f"({100 * result['fraction']:.3f}%)")
    return "\n".join(lines)
