"""Hugging Face PEFT adapter format: `export_peft` writes one, `import_peft` reads one.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, whose
tensors are named `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`,
`.lora_magnitude_vector` (DoRA) or `.ia3_l` ((IA)³: shape (out, 1) when scaling the output,
(1, in) when scaling the input). Only safetensors are read; a pickled `adapter_model.bin` is
refused.

LoRA and DoRA layers export their factors directly (PiSSA's residual base is folded back in as
extra rank). Methods whose adapters are exactly a LoRA update export as LoRA in one of two
ways: their layers define `lora_factors() -> (A, B, scale)` with W = W0 + scale · B A, or the
method has a whole-model converter in `LORA_CONVERSIONS` (PaCA: `paca_to_lora`), which export
applies to a copy of the model.
"""
from __future__ import annotations

import copy
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import api
from .errors import LeantuneError
from .io import _single_adapter_name, atomic_directory, attach_with_state, load_tensors, read_json_file, save_tensors
from .methods.base import MethodConfig
from .methods.layer import AdapterLayer, named_adapter_layers
from .methods.dora import DoRA, DoRALayer
from .methods.ia3 import IA3, IA3Layer
from .methods.lora import LoRA, LoRALayer
from .convert import paca_to_lora
from .methods.targets import candidate_modules, resolve_targets

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_TENSOR_FILE = "adapter_model.safetensors"
PEFT_PICKLE_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
EXPORTABLE = "lora, dora, ia3, paca (and methods whose layers define lora_factors)"

# method name -> function that replaces that method's adapters on a model by equal LoRA adapters
LORA_CONVERSIONS: dict[str, Callable[[nn.Module], nn.Module]] = {"paca": paca_to_lora}


# -- export ---------------------------------------------------------------------------------

def export_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write the adapter on `model` as a Hugging Face PEFT adapter directory (atomically)."""
    name = _single_adapter_name(model, adapter_name)
    config = api.attached(model)[name]
    convert = LORA_CONVERSIONS.get(config.method_name)
    if convert is not None:  # on a copy: the caller's model keeps its own adapter
        model = convert(copy.deepcopy(model))
        config = api.attached(model)[name]
    layers = list(named_adapter_layers(model, name))
    if isinstance(config, IA3):
        document, tensors = _ia3_export(model, layers)
    else:
        document, tensors = _lora_export(model, config, layers)
    document.update({
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "inference_mode": True,
        "modules_to_save": None,
        "fan_in_fan_out": False,
    })
    with atomic_directory(path) as tmp:
        save_tensors(tensors, tmp / PEFT_TENSOR_FILE, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    return Path(path)


def lora_factors(layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) with the layer's update on the original base weight equal to scale · B A."""
    if isinstance(layer, LoRALayer):
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        if hasattr(layer, "pissa_A0"):  # the base holds W0 - s B0 A0, so the update on W0 is s (BA - B0 A0)
            a = torch.cat([a, -layer.pissa_A0])
            b = torch.cat([b, layer.pissa_B0], dim=1)
        return a, b, layer.scale
    hook = getattr(layer, "lora_factors", None)
    if callable(hook):
        return hook()
    raise LeantuneError(f"{type(layer).__name__} cannot be written in Hugging Face PEFT format; exportable: {EXPORTABLE}")


def _lora_export(model: nn.Module, config: MethodConfig,
                 layers: list[tuple[str, AdapterLayer]]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not layers:
        raise LeantuneError(f"method '{config.method_name}' cannot be written in Hugging Face PEFT format; "
                            f"exportable: {EXPORTABLE}")
    rslora = bool(getattr(config, "rslora", False)) and isinstance(config, LoRA)
    use_dora = all(isinstance(layer, DoRALayer) for _, layer in layers)
    tensors, ranks, alphas = {}, {}, {}
    for module_name, layer in layers:
        a, b, scale = lora_factors(layer)
        r = a.shape[0]
        ranks[module_name] = r
        if isinstance(config, LoRA) and r == config.r:
            alphas[module_name] = config.alpha
        else:  # PEFT's scaling is alpha / r (alpha / sqrt(r) with rsLoRA)
            alphas[module_name] = scale * (math.sqrt(r) if rslora else r)
        tensors[f"{PEFT_PREFIX}{module_name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module_name}.lora_B.weight"] = b
        if use_dora:
            tensors[f"{PEFT_PREFIX}{module_name}.lora_magnitude_vector"] = layer.magnitude.detach()
    r, rank_pattern = _default_and_pattern(ranks)
    alpha, alpha_pattern = _default_and_pattern(alphas)
    document = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": float(getattr(config, "dropout", 0.0)),
        "use_rslora": rslora,
        "use_dora": use_dora,
        "target_modules": _module_patterns(model, list(ranks)),
        "bias": "none",
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return document, tensors


def _ia3_export(model: nn.Module, layers: list[tuple[str, IA3Layer]]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors = {}
    for module_name, layer in layers:
        vector = layer.ia3_l.detach()
        tensors[f"{PEFT_PREFIX}{module_name}.ia3_l"] = vector[None, :] if layer.feedforward else vector[:, None]
    names = [n for n, _ in layers]
    feedforward = [n for n, layer in layers if layer.feedforward]
    short = _short_names(model, names)
    short_ff = _short_names(model, feedforward) if short is not None else None
    document = {
        "peft_type": "IA3",
        "target_modules": short if short_ff is not None else names,
        "feedforward_modules": short_ff if short_ff is not None else feedforward,
        "init_ia3_weights": True,
    }
    return document, tensors


def _default_and_pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value, and the modules that differ from it (PEFT's rank/alpha_pattern)."""
    default = Counter(values.values()).most_common(1)[0][0]
    return default, {name: v for name, v in values.items() if v != default}


def _short_names(model: nn.Module, names: list[str]) -> list[str] | None:
    """The last name components, if they pick out exactly `names` in the model; else None."""
    short = sorted({n.split(".")[-1] for n in names})
    matched = {n for n, _ in candidate_modules(model) if n.split(".")[-1] in short}
    return short if matched == set(names) else None


def _module_patterns(model: nn.Module, names: list[str]) -> list[str]:
    return _short_names(model, names) or names


# -- import ---------------------------------------------------------------------------------

def import_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Attach the Hugging Face PEFT adapter (LoRA, DoRA or IA3) in directory `path` to `model`."""
    document, tensors = _read_peft_adapter(Path(path))
    peft_type = document.get("peft_type")
    if peft_type == "LORA":
        config, state = _lora_import(model, document, tensors)
    elif peft_type == "IA3":
        config, state = _ia3_import(model, document, tensors)
    else:
        raise LeantuneError(f"'{path}' holds a PEFT adapter of type {peft_type!r}; leantune imports LORA (with or "
                            "without use_dora) and IA3")
    return attach_with_state(model, config, adapter_name, state)


def _read_peft_adapter(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not path.is_dir():
        raise LeantuneError(f"PEFT adapter directory '{path}' does not exist")
    config_path, tensor_path = path / PEFT_CONFIG_FILE, path / PEFT_TENSOR_FILE
    if not tensor_path.is_file():
        if (path / PEFT_PICKLE_FILE).is_file():
            raise LeantuneError(f"'{path}' holds {PEFT_PICKLE_FILE}, a pickle that leantune never loads; re-save the "
                                "adapter with PEFT's save_pretrained(..., safe_serialization=True)")
        raise LeantuneError(f"'{path}' is not a PEFT adapter: {PEFT_TENSOR_FILE} is missing")
    if not config_path.is_file():
        raise LeantuneError(f"'{path}' is not a PEFT adapter: {PEFT_CONFIG_FILE} is missing")
    document = read_json_file(config_path)
    if not isinstance(document, dict) or "peft_type" not in document:
        raise LeantuneError(f"'{config_path}' is not a PEFT adapter config (no peft_type)")
    tensors = {}
    for key, tensor in load_tensors(tensor_path).items():
        if not key.startswith(PEFT_PREFIX):
            raise LeantuneError(f"PEFT tensor '{key}' does not start with '{PEFT_PREFIX}'")
        tensors[key[len(PEFT_PREFIX):]] = tensor
    return document, tensors


def _refuse_unsupported(document: dict[str, Any], defaults: dict[str, Any]) -> None:
    """PEFT options leantune has no equivalent for must be at their neutral value."""
    for key, neutral in defaults.items():
        value = document.get(key, neutral)
        if value != neutral and not (neutral is None and value in ([], {}, "")):
            raise LeantuneError(f"PEFT option {key}={value!r} is not supported by import_peft (only {neutral!r})")


def _split_keys(tensors: dict[str, torch.Tensor], suffixes: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {leantune name: tensor}} from PEFT keys '<module><suffix>'."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix, local in suffixes.items():
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[local] = tensor
                break
        else:
            raise LeantuneError(f"PEFT tensor '{PEFT_PREFIX}{key}' is not one leantune knows how to import")
    return modules


def _lora_import(model: nn.Module, document: dict[str, Any],
                 tensors: dict[str, torch.Tensor]) -> tuple[MethodConfig, dict[str, torch.Tensor]]:
    _refuse_unsupported(document, {"bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
                                   "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
                                   "layer_replication": None, "use_qalora": False})
    use_dora = bool(document.get("use_dora", False))
    suffixes = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"}
    if use_dora:
        suffixes[".lora_magnitude_vector"] = "magnitude"
    modules = _split_keys(tensors, suffixes)
    cls = DoRA if use_dora else LoRA
    try:
        fields = {"r": document["r"], "alpha": document["lora_alpha"]}
    except KeyError as err:
        raise LeantuneError(f"PEFT LoRA config lacks {err.args[0]!r}") from None
    config = cls(**fields, dropout=float(document.get("lora_dropout") or 0.0),
                 rslora=bool(document.get("use_rslora", False)),
                 targets=_targets_for(model, cls, list(modules), document.get("target_modules")))
    return config, _flatten(modules)


def _ia3_import(model: nn.Module, document: dict[str, Any],
                tensors: dict[str, torch.Tensor]) -> tuple[MethodConfig, dict[str, torch.Tensor]]:
    _refuse_unsupported(document, {"fan_in_fan_out": False, "modules_to_save": None})
    modules = _split_keys(tensors, {".ia3_l": "ia3_l"})
    names = list(modules)
    hint = document.get("feedforward_modules") or []
    hint = [hint] if isinstance(hint, str) else list(hint)
    # PEFT marks a module as feed-forward when its name ends with a feedforward_modules entry.
    feedforward = [n for n in names if any(n.endswith(entry) for entry in hint)]
    ours = {n for n in names if any(n == e or n.endswith("." + e) for e in hint)}
    if ours != set(feedforward) or not all(any(n == e or n.endswith("." + e) for n in names) for e in hint):
        hint = feedforward  # the short names would not select the same modules in leantune: use full names
    for parts in modules.values():
        parts["ia3_l"] = parts["ia3_l"].reshape(-1)
    config = IA3(targets=_targets_for(model, IA3, names, document.get("target_modules"), feedforward=hint),
                 feedforward=hint)
    return config, _flatten(modules)


def _targets_for(model: nn.Module, cls: type[MethodConfig], names: list[str], hint: Any, **fields: Any) -> list[str] | str:
    """PEFT's own target_modules when they select exactly the modules in the file; else the full names."""
    if isinstance(hint, (str, list)) and hint:
        try:
            chosen = [n for n, _ in resolve_targets(model, cls(targets=hint, **fields))]
        except LeantuneError:
            chosen = None
        if chosen is not None and set(chosen) == set(names):
            return hint
    return names


def _flatten(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{module}.{local}": tensor for module, parts in modules.items() for local, tensor in parts.items()}
