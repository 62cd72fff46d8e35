"""Whole-model conversions between methods: a PaCA adapter is exactly a rank-r LoRA.

With A = the rows of the identity at the selected columns I and B = Δ at the same scaling,
x Aᵀ picks x[..., I], so s · B A x equals the PaCA update; nothing is approximated.
"""
from __future__ import annotations

import torch
from torch import nn

from . import api
from .methods.layer import bare_module_name
from .methods.lora import LoRA, LoRALayer
from .methods.paca import PaCA
from .methods.targets import replace_module


def paca_to_lora(model: nn.Module) -> nn.Module:
    """Replace every PaCA adapter by the rank-r LoRA it equals (A = rows of the identity at I, B = Δ).

    The result serves on any LoRA-capable stack and exports to the PEFT format. Merged PaCA
    adapters are unmerged first; the model is changed in place and returned.
    """
    registry = api.attached(model)
    for name, config in reversed(list(registry.items())):  # outer adapters first: inner ones stay intact
        if not isinstance(config, PaCA):
            continue
        layers = list(api.named_adapter_layers(model, name))
        targets = [bare_module_name(n) for n, _ in layers]
        lora = LoRA(r=config.r, alpha=config.alpha, quantize=config.quantize, targets=targets)
        for module_name, layer in reversed(layers):
            layer.unmerge()
            delta = layer.paca_delta.detach().clone()
            index = layer.paca_index
            layer.release()
            with torch.random.fork_rng(devices=[]):  # LoRA's init draws numbers we overwrite anyway
                converted = LoRALayer(layer.base_layer, name, lora)
            with torch.no_grad():
                converted.lora_A.zero_()
                converted.lora_A[torch.arange(config.r, device=index.device), index] = 1
                converted.lora_B.copy_(delta.to(converted.lora_B.dtype))
            replace_module(model, module_name, converted)
        registry[name] = lora
    api.bind_layers(model)
    api.refreeze(model)
    return model
