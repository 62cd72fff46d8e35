"""BitFit: only bias terms train.

Each targeted linear gets a trainable bias delta, zero-initialised: y = base(x) + δ. The base
bias itself never changes outside a merge, so `disabled` is exact, unmerge restores a stored
copy, and a saved adapter (the deltas) reproduces the outputs on a fresh base. With
`add_bias=True`, linears without a bias get one that starts at zero (δ alone); merging such a
layer gives the base module a bias, and unmerging removes it again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import LeantuneError
from .base import ModuleMethod, register
from .layer import AdapterLayer, adapter_dtype, dense_weight
from .targets import ALL_LINEAR, resolve_targets, unwrap


@register
@dataclass
class BitFit(ModuleMethod):
    """With targets="all-linear", only the linears that have a bias are adapted (all of them with add_bias)."""

    method_name: ClassVar[str] = "bitfit"

    add_bias: bool = False

    def validate(self) -> None:
        super().validate()
        self._require_bool("add_bias")

    def chosen_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        chosen = resolve_targets(model, self)
        if self.add_bias:
            return chosen
        biased = [(n, m) for n, m in chosen if unwrap(m).bias is not None]
        if not biased:
            raise LeantuneError("bitfit: none of the targeted linear layers has a bias; "
                                "pass add_bias=True to train zero-initialised biases")
        if self.targets != ALL_LINEAR and len(biased) < len(chosen):
            missing = next(n for n, m in chosen if unwrap(m).bias is None)
            raise LeantuneError(f"bitfit: target module '{missing}' has no bias; "
                                "drop it from targets or pass add_bias=True")
        return biased

    def wrap(self, name: str, module: nn.Module, adapter_name: str) -> "BitFitLayer":
        return BitFitLayer(module, adapter_name)


class BitFitLayer(AdapterLayer):
    method_name: ClassVar[str] = "bitfit"
    merged_base_tensors: ClassVar[tuple[str, ...]] = ("bias",)

    def __init__(self, base_layer: nn.Module, adapter_name: str):
        super().__init__(base_layer, adapter_name)
        weight = dense_weight(self.base_module())
        self.bias_delta = nn.Parameter(torch.zeros(self.out_features, dtype=adapter_dtype(weight), device=weight.device))
        self._added_bias = False

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return result + self.bias_delta.to(result.dtype)

    def merge_into_base(self) -> None:
        base = self.base_module()
        if base.bias is None:
            base.bias = nn.Parameter(self.bias_delta.detach().to(dense_weight(base).dtype).clone(), requires_grad=False)
            self._added_bias = True
        else:
            base.bias.add_(self.bias_delta.to(base.bias.dtype))

    def unmerge(self) -> None:
        super().unmerge()
        if self._added_bias:
            self.base_module().bias = None
            self._added_bias = False
