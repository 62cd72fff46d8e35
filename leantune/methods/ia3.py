"""(IA)³: learned per-channel scaling vectors, initialised to ones.

Attention key/value projections scale their output, y = l ⊙ (W0 x + b); feed-forward down
projections scale their input, y = W0 (l ⊙ x) + b. Merging folds l into the weight's rows (and
the bias) for output scaling, into its columns for input scaling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import LeantuneError
from .base import ModuleMethod, register
from .layer import AdapterLayer, adapter_dtype, dense_weight
from .rows import RowForm
from .targets import resolve_targets

DEFAULT_TARGETS = ["k_proj", "v_proj", "down_proj"]
DEFAULT_FEEDFORWARD = ["down_proj"]


@register
@dataclass
class IA3(ModuleMethod):
    """`targets` get a vector; those among them whose names end in a `feedforward` entry scale their input."""

    method_name: ClassVar[str] = "ia3"

    targets: str | list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS), kw_only=True)
    feedforward: list[str] = field(default_factory=lambda: list(DEFAULT_FEEDFORWARD))

    def validate(self) -> None:
        super().validate()
        if isinstance(self.feedforward, str):
            self.feedforward = [self.feedforward]
        if not isinstance(self.feedforward, (list, tuple)) or not all(isinstance(f, str) and f for f in self.feedforward):
            # an empty list is fine: every target then scales its output
            raise LeantuneError(f"ia3: 'feedforward' must be a list of module names, got {self.feedforward!r}")
        self.feedforward = list(self.feedforward)

    def is_feedforward(self, module_name: str) -> bool:
        return any(module_name == f or module_name.endswith("." + f) for f in self.feedforward)

    def chosen_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        try:
            chosen = resolve_targets(model, self)
        except LeantuneError as err:
            if self.targets != DEFAULT_TARGETS:
                raise
            architecture = type(model).__name__
            raise LeantuneError(f"{err} (ia3 defaults to the Llama-style names {', '.join(DEFAULT_TARGETS)}, which "
                                f"{architecture} does not have; set targets=[...] and feedforward=[...], the config "
                                "keys method.targets and method.feedforward)") from None
        names = [name for name, _ in chosen]
        for entry in self.feedforward:
            if not any(name == entry or name.endswith("." + entry) for name in names):
                raise LeantuneError(f"ia3: feedforward entry '{entry}' matches none of the targeted modules; "
                                    "feedforward names must be among the targets")
        return chosen

    def wrap(self, name: str, module: nn.Module, adapter_name: str) -> "IA3Layer":
        return IA3Layer(module, adapter_name, self.is_feedforward(name))


class IA3Layer(AdapterLayer):
    method_name: ClassVar[str] = "ia3"
    def __init__(self, base_layer: nn.Module, adapter_name: str, feedforward: bool):
        super().__init__(base_layer, adapter_name)
        weight = dense_weight(self.base_module())
        self.feedforward = feedforward
        size = self.in_features if feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=adapter_dtype(weight), device=weight.device))

    @property
    def merged_base_tensors(self) -> tuple[str, ...]:
        return ("weight",) if self.feedforward else ("weight", "bias")

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return self.base_layer((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))
        result = self.base_layer(x)
        return (result.to(self.ia3_l.dtype) * self.ia3_l).to(result.dtype)

    def row_form(self) -> RowForm:
        """l scales the input (feed-forward) or the output, bias included."""
        if self.feedforward:
            return RowForm(pre=self.ia3_l)
        return RowForm(post=self.ia3_l, post_scales_bias=True)

    def weight_with_update(self, below: torch.Tensor) -> torch.Tensor | None:
        vector = self.ia3_l.to(below.dtype)
        return below * (vector[None, :] if self.feedforward else vector[:, None])

    def merge_into_base(self) -> None:
        base = self.base_module()
        vector = self.ia3_l.to(base.weight.dtype)
        if self.feedforward:
            base.weight.mul_(vector[None, :])
        else:
            base.weight.mul_(vector[:, None])
            if base.bias is not None:
                base.bias.mul_(vector.to(base.bias.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scales={'input' if self.feedforward else 'output'}"
