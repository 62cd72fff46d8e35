"""Bottleneck adapters: a small two-layer network after or beside a whole sublayer.

    serial   (Houlsby, Pfeiffer): y = h + s · W_up σ(W_down h),  h = sublayer(x)
    parallel (He et al.):         y = h + s · W_up σ(W_down x)

The wrapped modules are the decoder blocks' attention and feed-forward sublayers, `self_attn` and
`mlp` in Llama, Qwen2 and Mistral: `where="ffn"` (Pfeiffer), `"attn"`, or `"both"` (Houlsby);
`targets` names the sublayers of other models. W_up starts at zero, so attaching changes nothing;
W_down starts as nn.Linear's weights do. A sublayer that returns a tuple (attention: its output and
the attention weights) has its first element adapted. σ makes the update depend on the
activations, so no change of weights expresses it: adapters cannot be merged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeantuneError
from .base import ModuleMethod, register
from .layer import AdapterLayer, adapter_dtype
from .targets import ALL_LINEAR, resolve_targets

SUBLAYERS = {"ffn": ["mlp"], "attn": ["self_attn"], "both": ["self_attn", "mlp"]}
ACTIVATIONS = {"relu": F.relu, "silu": F.silu}
PLACEMENTS = ("serial", "parallel")
DEFAULT_BOTTLENECK = 64


@register
@dataclass
class Adapter(ModuleMethod):
    """A bottleneck of `bottleneck` features (64 when neither is given) or hidden // `reduction`.

    Left unset, `targets` becomes the Llama-style names of the sublayers `where` picks."""

    method_name: ClassVar[str] = "adapter"
    target_types: ClassVar[tuple[type, ...]] = (nn.Module,)  # whole sublayers, not linears
    mergeable: ClassVar[bool] = False

    bottleneck: int | None = None
    reduction: int | None = None
    placement: str = "serial"
    where: str = "ffn"
    activation: str = "relu"
    scale: float = 1.0
    targets: str | list[str] | None = field(default=None, kw_only=True)

    def validate(self) -> None:
        self._require_choice("where", tuple(SUBLAYERS))
        if self.targets is None:  # resolved once, so a saved config names the sublayers it wrapped
            self.targets = list(SUBLAYERS[self.where])
        if self.targets == ALL_LINEAR:
            raise LeantuneError("adapter: targets 'all-linear' would wrap single linears; adapters wrap whole "
                                "sublayers: leave targets unset (where='ffn', 'attn' or 'both') or name the sublayers")
        super().validate()
        if self.bottleneck is not None and self.reduction is not None:
            raise LeantuneError(f"adapter: give 'bottleneck' or 'reduction', not both (got bottleneck={self.bottleneck}, "
                                f"reduction={self.reduction})")
        for key in ("bottleneck", "reduction"):
            if getattr(self, key) is not None:
                self._require_int(key)
        self._require_choice("placement", PLACEMENTS)
        self._require_choice("activation", tuple(ACTIVATIONS))
        self._require_number("scale")

    def bottleneck_width(self, hidden: int) -> int:
        if self.reduction is not None:
            return hidden // self.reduction
        return DEFAULT_BOTTLENECK if self.bottleneck is None else self.bottleneck

    def chosen_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        try:
            return resolve_targets(model, self)
        except LeantuneError as err:
            if self.targets != SUBLAYERS[self.where]:
                raise
            raise LeantuneError(f"{err} (adapter wraps the Llama-style sublayers {', '.join(SUBLAYERS['both'])} by "
                                "default; pass targets=[...] naming this model's attention or feed-forward modules)") from None

    def check_target(self, name: str, module: nn.Module) -> None:
        hidden = sublayer_width(name, module)
        width = self.bottleneck_width(hidden)
        if width < 1:
            raise LeantuneError(f"adapter: 'reduction' = {self.reduction} leaves no bottleneck feature of the {hidden} "
                                f"that '{name}' carries; choose reduction <= {hidden}")
        if width > hidden:
            raise LeantuneError(f"adapter: 'bottleneck' = {width} is wider than the {hidden} features of '{name}'; "
                                f"choose bottleneck <= {hidden}")

    def wrap(self, name: str, module: nn.Module, adapter_name: str) -> "BottleneckLayer":
        return BottleneckLayer(module, adapter_name, sublayer_width(name, module), self)


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear layer, transformers' Conv1D (GPT-2: weight [in, out]) included."""
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int):
        return int(module.weight.shape[0]), module.nf
    return None


def sublayer_width(name: str, module: nn.Module) -> int:
    """The residual-stream width a sublayer reads and writes: its first linear's input, which some
    linear of it must also give out (modules are listed in the order they were created, not run:
    Phi3 creates o_proj before its fused qkv_proj)."""
    shapes = [shape for m in module.modules() if (shape := _features(m)) is not None]
    if not shapes:
        raise LeantuneError(f"adapter: target '{name}' ({type(module).__name__}) holds no linear layer to tell its "
                            "width by; adapters wrap attention or feed-forward sublayers")
    width = shapes[0][0]
    if width not in {out for _, out in shapes}:
        raise LeantuneError(f"adapter: target '{name}' reads {width} features but none of its linears gives "
                            f"{width} out; adapters wrap sublayers whose output adds to their input (attention, "
                            "feed-forward)")
    return width


class BottleneckLayer(AdapterLayer):
    method_name: ClassVar[str] = "adapter"

    def __init__(self, base_layer: nn.Module, adapter_name: str, hidden: int, config: Adapter):
        super().__init__(base_layer, adapter_name)
        reference = next(base_layer.parameters())
        kind = {"dtype": adapter_dtype(reference), "device": reference.device}
        width = config.bottleneck_width(hidden)
        self.parallel = config.placement == "parallel"
        self.activation = config.activation
        self.scale = config.scale
        self.adapter_down = nn.Parameter(torch.empty(width, hidden, **kind))
        self.adapter_up = nn.Parameter(torch.zeros(hidden, width, **kind))
        nn.init.kaiming_uniform_(self.adapter_down, a=math.sqrt(5))  # nn.Linear's default

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not args and "hidden_states" in kwargs:  # decoder blocks call self_attn(hidden_states=..., ...)
            args = (kwargs.pop("hidden_states"),)
        return super().forward(*args, **kwargs)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(x, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        adapted = h + self.update(x if self.parallel else h).to(h.dtype)
        return (adapted, *out[1:]) if isinstance(out, tuple) else adapted

    def update(self, source: torch.Tensor) -> torch.Tensor:
        """s · W_up σ(W_down source), in the adapter's dtype."""
        down = F.linear(source.to(self.adapter_down.dtype), self.adapter_down)
        return self.scale * F.linear(ACTIVATIONS[self.activation](down), self.adapter_up)

    def extra_repr(self) -> str:
        placement = "parallel" if self.parallel else "serial"
        return (f"{super().extra_repr()}, bottleneck={self.adapter_down.shape[0]}, placement={placement}, "
                f"activation={self.activation}, scale={self.scale}")
