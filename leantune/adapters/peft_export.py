"""Export to the Hugging Face PEFT adapter format (`adapter_config.json` + `adapter_model.safetensors`,
tensors named `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`
(DoRA) or `.ia3_l`; prompt and prefix tuning's one tensor is `prompt_embeddings`), the files and keys
PEFT's and vLLM's loaders read.

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
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .. import api
from ..convert import paca_to_lora
from ..errors import LeantuneError
from ..files import atomic_directory, save_tensors
from ..methods.base import MethodConfig
from ..methods.dora import DoRALayer
from ..methods.ia3 import IA3, IA3Layer
from ..methods.layer import AdapterLayer, bare_module_name, named_adapter_layers
from ..methods.lora import LoRA, LoRALayer
from ..methods.prompt import PromptTuning
from ..methods.prefix import KEYS, VALUES, PrefixTuning, prefix_shape
from ..methods.targets import LinearFromConv1D, candidate_modules
from .native import single_adapter_name

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_TENSOR_FILE = "adapter_model.safetensors"
PEFT_PICKLE_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
EXPORTABLE = "lora, dora, ia3, paca, prompt, prefix (and methods whose layers define lora_factors)"

# method name -> function that replaces that method's adapters on a model by equal LoRA adapters
LORA_CONVERSIONS: dict[str, Callable[[nn.Module], nn.Module]] = {"paca": paca_to_lora}


def export_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write the adapter on `model` as a Hugging Face PEFT adapter directory (atomically)."""
    name = single_adapter_name(model, adapter_name)
    config = api.attached(model)[name]
    convert = LORA_CONVERSIONS.get(config.method_name)
    if convert is not None:  # on a copy: the caller's model keeps its own adapter
        model = convert(copy.deepcopy(model))
        config = api.attached(model)[name]
    layers = [(bare_module_name(n), layer) for n, layer in named_adapter_layers(model, name)]
    if isinstance(config, PromptTuning):
        document, tensors = _prompt_tuning_export(model, config, name)
    elif isinstance(config, IA3):
        document, tensors = _ia3_export(model, layers)
    elif isinstance(config, PrefixTuning):
        document, tensors = _prefix_export(model, config, name)
    else:
        document, tensors = _lora_export(model, config, layers)
    document.update({
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "task_type": _peft_task_type(model),
        "inference_mode": True,
        "modules_to_save": None,
    })
    with atomic_directory(path) as tmp:
        save_tensors(tensors, tmp / PEFT_TENSOR_FILE, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    return Path(path)


def _peft_task_type(model: nn.Module) -> str | None:
    """CAUSAL_LM for a causal LM: without it PEFT wraps no forward, and prompt and prefix tuning load as no-ops.
    transformers' causal-LM classes go by several names (GPT2LMHeadModel, LlamaForCausalLM); its own table
    lists them, and the two suffixes cover remote-code models outside it."""
    name = type(model).__name__
    causal = name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith(("ForCausalLM", "LMHeadModel"))
    return "CAUSAL_LM" if causal else None


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
    raise LeantuneError(f"method '{layer.method_name}' cannot be written in Hugging Face PEFT format; exportable: {EXPORTABLE}")


def _stored_transposed(layers: list[tuple[str, AdapterLayer]]) -> bool:
    """PEFT's fan_in_fan_out: the targets are Conv1D layers (GPT-2), whose weights are stored [in, out]."""
    return any(isinstance(layer.base_module(), LinearFromConv1D) for _, layer in layers)


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
        "fan_in_fan_out": _stored_transposed(layers),
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
        "fan_in_fan_out": _stored_transposed(layers),
    }
    return document, tensors


# leantune's prompt-tuning init -> PEFT's prompt_tuning_init
PEFT_PROMPT_INITS = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}


def _prompt_tuning_export(model: nn.Module, config: PromptTuning,
                          name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's PROMPT_TUNING: one (num_virtual_tokens, token_dim) table, the keys PEFT writes for it."""
    prompt = config.state_dict(model, name)["prompt_embeddings"].detach()
    model_config = getattr(model, "config", None)
    text = config.init == "text"
    document = {
        "peft_type": "PROMPT_TUNING",
        "auto_mapping": None,
        "revision": None,
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": _first_attribute(model_config, ("num_attention_heads", "n_head", "num_heads")),
        "num_layers": _first_attribute(model_config, ("num_hidden_layers", "num_layers", "n_layer")),
        "prompt_tuning_init": PEFT_PROMPT_INITS[config.init],
        "prompt_tuning_init_text": config.init_text if text else None,
        # PEFT requires a tokenizer name with TEXT; leantune embedded the text with the model's own
        "tokenizer_name_or_path": getattr(model_config, "_name_or_path", None) if text else None,
        "tokenizer_kwargs": None,
    }
    return document, {"prompt_embeddings": prompt}


def _first_attribute(config: Any, names: tuple[str, ...]) -> Any:
    """The first of `names` the model config sets (architectures name their sizes differently)."""
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


def _prefix_export(model: nn.Module, config: PrefixTuning, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's PREFIX_TUNING adapter: the plain prefixes (prefix_projection false), its widths those of the
    key/value heads as PEFT sets them for grouped-query models."""
    shape = prefix_shape(model, config.num_virtual_tokens)
    state = config.state_dict(model, name)
    document = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": shape.virtual,
        "token_dim": shape.width,
        "num_layers": shape.layers,
        "num_attention_heads": shape.kv_heads,
        "num_transformer_submodules": 1,
        "prefix_projection": False,
        "encoder_hidden_size": shape.width,
        "init_weights": None,
    }
    return document, {"prompt_embeddings": prefix_to_peft(state[KEYS].detach(), state[VALUES].detach())}


def prefix_to_peft(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(layers, kv_heads, virtual, head_dim) keys and values -> PEFT's (virtual, layers · 2 · kv_heads · head_dim):
    per virtual token, layer after layer, each layer's key then its value, heads side by side."""
    both = torch.stack([keys, values], dim=1)  # (layers, 2, heads, virtual, head_dim)
    return both.permute(3, 0, 1, 2, 4).reshape(keys.shape[2], -1)


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

# Config keys that say where an adapter came from or how PEFT holds it, never what it computes.
