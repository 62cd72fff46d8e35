"""attach / detach / merge / unmerge / disabled / use / summary: the adapter API on any nn.Module."""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

from torch import nn

from .errors import LeantuneError
from .methods.base import MethodConfig
from .methods.hybrid import Hybrid
from .methods.layer import (PART_SEPARATOR, AdapterLayer, Router, adapter_layers, model_router, named_adapter_layers,
                            owner_name)
from .methods.rows import layer_stack
from .methods.targets import LinearFromConv1D, module_sharing_weight, replace_module, weight_holders

_REGISTRY_ATTR = "leantune_adapters"


def attached(model: nn.Module) -> dict[str, MethodConfig]:
    """The adapters on `model`, by adapter name, in the order they were attached."""
    return model.__dict__.setdefault(_REGISTRY_ATTR, {})


def attach(model: nn.Module, config: MethodConfig | list[MethodConfig], adapter_name: str = "default") -> nn.Module:
    """Adapt `model` in place with `config`, freeze everything else, and return the model.

    A list of configs on disjoint targets (e.g. prefix tuning plus a parallel adapter, the MAM
    adapter) becomes one hybrid adapter: trained, saved and loaded as one."""
    if isinstance(config, (list, tuple)):
        config = Hybrid(parts=list(config))
    if not isinstance(config, MethodConfig):
        raise LeantuneError(f"attach expects a method config such as lt.LoRA(...), got {type(config).__name__}")
    registry = attached(model)
    if adapter_name in registry:
        raise LeantuneError(f"an adapter named '{adapter_name}' is already attached; detach it or choose another adapter_name")
    if not isinstance(adapter_name, str) or not adapter_name or PART_SEPARATOR in adapter_name:
        raise LeantuneError(f"adapter_name must be a non-empty string without '{PART_SEPARATOR}', got {adapter_name!r}")
    _refuse_stacking_with_full(registry, config)
    config.attach_to_model(model, adapter_name)
    registry[adapter_name] = config
    for layer in adapter_layers(model, adapter_name):  # new layers take the mode of what they wrap
        layer.train(layer.base_layer.training)
    bind_layers(model)
    chosen = router(model).selected
    if chosen is not None:  # a new adapter runs, next to what lt.use chose
        router(model).select([*chosen, adapter_name])
    refreeze(model)
    _install_row_routing(model)
    return model


def _refuse_stacking_with_full(registry: dict[str, MethodConfig], config: MethodConfig) -> None:
    """Full fine-tuning trains every weight, the other adapters' included: it cannot share a model."""
    full = [name for name, existing in registry.items() if existing.method_name == "full"]
    if full:
        raise LeantuneError(f"adapter '{full[0]}' is full fine-tuning, which trains every weight of the model; "
                            "detach it before attaching another adapter")
    if config.method_name == "full" and registry:
        raise LeantuneError(f"full fine-tuning trains every weight of the model, but adapter '{next(iter(registry))}' "
                            "is attached; detach the adapters first")


_ROUTING_HOOKS_ATTR = "leantune_routing_hooks"
_ROUTING_STACK_ATTR = "leantune_routing_stack"  # per forward, outermost first: whether it set the rows
BASE_ROW = "__base__"  # PEFT's name for "no adapter" in adapter_names; None and "base" mean the same
ROUTABLE_METHODS = ("lora", "dora", "ia3", "paca", "prompt")


def _install_row_routing(model: nn.Module) -> None:
    """`model(..., adapter_names=[...])` and `model.generate(..., adapter_names=[...])` give each batch
    row its own adapter (methods/rows.py); adapter_names=None is the plain forward, as in PEFT."""
    if _ROUTING_HOOKS_ATTR in model.__dict__:
        return
    hooks = [model.register_forward_pre_hook(_route_rows, with_kwargs=True),
             model.register_forward_hook(_end_row_routing, with_kwargs=True, always_call=True)]
    if callable(getattr(model, "generate", None)):
        model.generate = functools.partial(_generate_per_row, model)
    model.__dict__[_ROUTING_HOOKS_ATTR] = hooks


# Module-level hooks that act on the model they are called with and keep their state on it: a
# deepcopy of the model then routes its own rows (closures would route the original's), and it pickles.
def _route_rows(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    names = kwargs.pop("adapter_names", None)
    model.__dict__.setdefault(_ROUTING_STACK_ATTR, []).append(names is not None)
    if names is not None:
        router(model).rows = row_names(model, names)
    return args, kwargs


def _end_row_routing(model: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
    entered = model.__dict__.get(_ROUTING_STACK_ATTR)
    if entered and entered.pop():
        router(model).rows = None
    return output


def row_names(model: nn.Module, names: Any) -> tuple[str | None, ...]:
    """adapter_names checked: a list with one routable adapter name, or None / "__base__" / "base", per row."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise LeantuneError(f"adapter_names must be a list with one adapter name (or None) per batch row, got {names!r}")
    registry = attached(model)
    blocking = [name for name, config in registry.items() if config.method_name not in ROUTABLE_METHODS]
    if blocking:
        raise LeantuneError(f"adapter '{blocking[0]}' is {registry[blocking[0]].method_name}, which cannot run one "
                            f"per batch row; adapter_names= works when every attached adapter is one of "
                            f"{', '.join(ROUTABLE_METHODS)} (detach it, or serve its merged export)")
    rows = []
    for name in names:
        if name is None or name == BASE_ROW or (name == "base" and "base" not in registry):
            rows.append(None)
        elif name in registry:
            rows.append(name)
        else:
            raise LeantuneError(f"adapter_names names '{name}', which is not attached (attached: "
                                f"{', '.join(registry) or 'none'}; None or '{BASE_ROW}' for the base model)")
    off = [name for name in rows if name is not None and name in router(model).switched_off]
    if off:  # neither silently the base (PEFT's choice) nor silently the adapter the block switched off
        raise LeantuneError(f"adapter_names names '{off[0]}', which the enclosing lt.disabled block switches off; "
                            "run the rows outside the block, or name None for the base model")
    return tuple(rows)


def _generate_per_row(model: nn.Module, *args: Any, adapter_names: Any = None, **kwargs: Any) -> Any:
    """model.generate with adapter_names: the rows keep their adapter through every step (beams and
    returned sequences of a row are copies of it)."""
    generate = type(model).generate.__get__(model)  # the class's own generate (this one shadows it)
    if adapter_names is None:
        return generate(*args, **kwargs)
    rows = row_names(model, adapter_names)
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    copies = beams if beams > 1 else returned  # transformers expands each row to its beams, else to its samples
    routes = router(model)
    previous, routes.rows = routes.rows, tuple(name for name in rows for _ in range(copies))
    trusted = routes.trust_versions
    # The first step reads every adapter tensor against the stacked copy (a `.data` write since the
    # last call is seen); nothing else runs between the steps, so the later ones skip that read.
    first_step_done = model.register_forward_hook(lambda *_: setattr(routes, "trust_versions", True))
    try:
        return generate(*args, **kwargs)
    finally:
        first_step_done.remove()
        routes.rows, routes.trust_versions = previous, trusted


def virtual_tokens(model: nn.Module) -> int:
    """Positions the running prompt and prefix adapters put before a plain forward's input."""
    return sum(int(getattr(part, "num_virtual_tokens", 0) or 0) for name, config in attached(model).items()
               if router(model).runs(name) for part in config.components())


def router(model: nn.Module) -> Router:
    """The model's router: which adapters its forwards run (methods/layer.py)."""
    return model_router(model)


def bind_layers(model: nn.Module) -> None:
    """Every adapter layer of `model` reads the model's router (after attach or a conversion)."""
    shared = router(model)
    shared.layout += 1
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
    return [layer for layer in adapter_layers(model) if owner_name(layer.adapter_name) in names]


def check_mergeable(model: nn.Module, names: list[str]) -> None:
    """Refuse, before anything merges, an adapter whose update no change of the base weights expresses,
    and one on a weight another module shares (tied embeddings: merging would change that one too)."""
    for name in names:
        config = attached(model)[name]
        if not config.mergeable:
            raise LeantuneError(f"adapter '{name}' ({config.method_name}) cannot be merged into the base weights: "
                                "its update is not a change of weights, so it stays an adapter (lt.save_adapter, lt.load_adapter)")
    holders = weight_holders(model)
    for layer in _layers_of(model, names):
        holder = None if layer.merged else module_sharing_weight(model, layer.base_module(), holders)
        if holder is not None:
            raise LeantuneError(f"adapter '{owner_name(layer.adapter_name)}' sits on a weight that '{holder}' shares "
                                "(tied input and output embeddings): merging would change that module too; keep the "
                                "adapter unmerged (lt.save_adapter), or leave the output head out of its targets")


def merge(model: nn.Module, adapter_name: str | None = None, requantize: bool = False) -> nn.Module:
    """Fold adapters into the base weights; inner (earlier) adapters first.

    Into a 4-bit (NF4) base only with requantize=True: the sum is rounded back to 4 bits, which
    moved QLoRA's logits by about 0.1 on a tiny model. lt.save_merged_model merges into a dense
    copy instead, exactly."""
    names = _names(model, adapter_name)
    left_out = [name for name in names if not router(model).runs(name)]
    if adapter_name is not None and left_out:
        raise LeantuneError(f"adapter '{adapter_name}' is left out by lt.use (or switched off by lt.disabled); "
                            "merging it would change what a plain forward runs")
    names = [name for name in names if name not in left_out]  # merge what a plain forward runs
    check_mergeable(model, names)
    layers = _layers_of(model, names)
    four_bit = next((layer for layer in layers if not layer.merged and callable(getattr(layer.base_module(), "quantize_", None))), None)
    if four_bit is not None and not requantize:
        raise LeantuneError(f"adapter '{owner_name(four_bit.adapter_name)}' sits on a 4-bit base: merging rounds its "
                            "update into 4 bits and changes the outputs; lt.save_merged_model merges into a dense copy "
                            "exactly, or pass requantize=True to accept the rounding")
    _check_columns_below(layers)
    for layer in reversed(layers):
        layer.merge()
    return model


def _check_columns_below(merging: list[AdapterLayer]) -> None:
    """A layer merging into a base weight whose columns an unmerged PaCA layer below manages would
    see its update overwritten in those columns when PaCA places its own: refused instead."""
    for layer in merging:
        below = layer_stack(layer)[1:]
        if layer.merged or layer.cleans_base_in_place or not below or not below[-1].cleans_base_in_place:
            continue
        pending = next((m for m in below if m.cleans_base_in_place and not m.merged and m not in merging), None)
        if pending is not None:
            raise LeantuneError(f"adapter '{owner_name(layer.adapter_name)}' would merge into base columns that "
                                f"PaCA adapter '{owner_name(pending.adapter_name)}' below it manages; merge or "
                                "detach that one first")


def unmerge(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Restore the exact base weights saved at merge time; outer (later) adapters first."""
    for layer in _layers_of(model, _names(model, adapter_name)):
        layer.unmerge()
    return model


def detach(model: nn.Module, adapter_name: str | None = None, keep_merged: bool = False,
           requantize: bool = False) -> nn.Module:
    """Remove adapters and return the base model: exact base weights, or merged ones with keep_merged=True.

    A base quantized at attach time (quantize="nf4") stays an NF4 module: its float weights were
    not kept, which is what saved the memory; keeping an adapter merged into it needs
    requantize=True (see `merge`). A sketched base becomes a dense nn.Linear of Ŵ.
    """
    names = _names(model, adapter_name)
    registry = attached(model)
    if keep_merged:
        merge(model, adapter_name, requantize=requantize)
    else:
        unmerge(model, adapter_name)
    for name in reversed(names):
        for module_name, layer in reversed(list(named_adapter_layers(model, name))):
            layer.release()
            base = layer.base_layer
            replace_module(model, module_name, base.to_conv1d() if isinstance(base, LinearFromConv1D) else base)
        registry[name].detach_from_model(model, name)
        del registry[name]
        router(model).layout += 1
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
    merged = [owner_name(layer.adapter_name) for layer in _layers_of(model, left_out) if layer.merged]
    if merged:
        raise LeantuneError(f"adapter '{merged[0]}' is merged into the base weights; lt.unmerge it before "
                            "lt.use leaves it out")
    for name, config in registry.items():  # model methods switch themselves
        config.set_disabled(model, name, name not in names)
    routes.select(names)
    return model


def summary(model: nn.Module, print_table: bool = False) -> dict[str, Any]:
    """Trainable and total parameter counts, per adapter and overall. A 4-bit (NF4) or sketched base
    weight counts as the dense weight it stands for, as PEFT counts 4-bit weights (its codes are
    buffers); adapter tensors count on top of the base, SketchTune's tables too."""
    total = sum(p.numel() for p in model.parameters()) + sum(
        _dense_numel(module) - sum(p.numel() for p in module.parameters(recurse=False))
        for module in model.modules() if callable(getattr(module, "dense_numel", None)))
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
