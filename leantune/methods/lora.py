"""LoRA: y = W0 x + s · B A x with s = alpha / r (alpha / sqrt(r) with rsLoRA).

The common case (a plain frozen nn.Linear base, with or without dropout) runs as one fused
autograd function: the adapter product is added into the base output in place, the backward
reuses G·B for both dX and dA, and only x (after dropout) and x·Aᵀ (r × tokens) are saved.

LoRA-FA (`freeze_a=True`): A stays at its random init and only B trains. A is then a frozen
parameter, saved with the adapter (it defines the update) but never given to the optimizer, and
backward needs x only for dA: the fused function keeps x·Aᵀ alone, r × tokens instead of
in × tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import LeantuneError
from .base import ModuleMethod, register
from .layer import AdapterLayer, adapter_dtype, add_to_weight, autocast_active, runs_default_off_path
from .rows import RowForm

INITS = ("kaiming", "gaussian", "pissa")


@register
@dataclass
class LoRA(ModuleMethod):
    method_name: ClassVar[str] = "lora"

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    quantize: str | None = None
    freeze_a: bool = False

    def validate(self) -> None:
        super().validate()
        self._require_int("r")
        self._require_number("alpha", low=0, low_open=True)
        self._require_number("dropout", low=0, high=0.999)
        self._require_choice("init", INITS)
        self._require_choice("quantize", (None, "nf4"))
        self._require_bool("freeze_a")
        if self.init == "pissa" and self.quantize is not None:
            raise LeantuneError(f"{self.method_name}: init 'pissa' rewrites the base weight and cannot be combined with quantize")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def writes_base_weight(self) -> bool:
        return self.init == "pissa"  # the base keeps the residual W - scale·B A

    def check_target(self, name: str, module: nn.Module) -> None:
        if self.init == "pissa" and isinstance(module, AdapterLayer):
            # PiSSA rewrites the base weight; under it, another adapter's output is not that weight's
            raise LeantuneError(f"{self.method_name}: init 'pissa' rewrites the base weight, but '{name}' already "
                                f"carries a {module.method_name} adapter; attach the PiSSA adapter first or on its own")
        # B A has rank at most min(in, out): a larger r adds memory, never expressiveness.
        limit = min(module.in_features, module.out_features)
        if self.r > limit:
            raise LeantuneError(f"{self.method_name}: 'r' = {self.r} exceeds the rank {limit} that '{name}' "
                                f"({module.in_features} → {module.out_features} features) can hold; choose r <= {limit}")

    def wrap(self, name: str, module: nn.Module, adapter_name: str) -> "LoRALayer":
        return LoRALayer(module, adapter_name, self)


class _FusedLoRA(torch.autograd.Function):
    """y = x Wᵀ + b + s (xd Aᵀ) Bᵀ for a frozen W and b; xd is x after LoRA dropout (None: x itself).

    The rank-r intermediates xd Aᵀ and G B are formed as r × tokens (A xdᵀ, Bᵀ Gᵀ): on CPU these
    skinny products run 2-3× faster in that layout than as tokens × r, and so do the two
    factor gradients that read them. Saved for backward: xd Aᵀ (for dB), and xd only when A
    trains (dA = s (G B)ᵀ xd); dX = G W + s (G B) A needs only the weights. Dropout itself stays
    outside (F.dropout keeps its mask and routes dXd back to x), as in dora.py.
    """

    @staticmethod
    def forward(ctx, x, x_dropped, weight, bias, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if x_dropped is None else x_dropped.reshape(-1, x.shape[-1])
        xa_t = lora_a @ xd2.t()
        out = kernels.linear(x2, weight, bias)
        out.addmm_(xa_t.t(), lora_b.t(), alpha=scale)
        ctx.save_for_backward(xd2 if ctx.needs_input_grad[4] else None, xa_t, weight, lora_a, lora_b)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        xd2, xa_t, weight, lora_a, lora_b = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gb_t = lora_b.t() @ g2.t()  # r × tokens, shared by dX (or dXd) and dA
        grad_x = grad_xd = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_xd = (gb_t.t() @ lora_a).mul_(ctx.scale).view(ctx.x_shape)
        if ctx.needs_input_grad[0]:
            grad_x = kernels.matmul(g2, weight)
            if grad_xd is None:
                grad_x.addmm_(gb_t.t(), lora_a, alpha=ctx.scale)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[4]:
            grad_a = (gb_t @ xd2).mul_(ctx.scale)
        if ctx.needs_input_grad[5]:
            grad_b = (xa_t @ g2).mul_(ctx.scale).t().contiguous()
        return grad_x, grad_xd, None, None, grad_a, grad_b, None


class LoRALayer(AdapterLayer):
    method_name: ClassVar[str] = "lora"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoRA):
        super().__init__(base_layer, adapter_name)
        weight = self.base_module().weight
        self.scale = config.scale
        self.dropout = config.dropout
        self.freeze_a = config.freeze_a
        kind = {"dtype": adapter_dtype(weight), "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, **kind), requires_grad=not config.freeze_a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, **kind))
        # PiSSA's W0, for disabled forwards and detach: a buffer, so that .to() / .cuda() move and cast it
        # with the model; not persistent: a saved adapter rebuilds it from the base and pissa_A0 / B0
        self.register_buffer("_original_weight", None, persistent=False)
        if config.init == "pissa":
            self._init_pissa(config.r)
        elif config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable tensors: LoRA-FA leaves A out (it stays in the saved state)."""
        for param in super().adapter_parameters():
            if not (self.freeze_a and param is self.lora_A):
                yield param

    # -- PiSSA: principal singular directions move from W0 into A and B -----------------
    def _init_pissa(self, r: int) -> None:
        base = self.base_module()
        u, s, vh = torch.linalg.svd(base.weight.detach().double(), full_matrices=False)
        root = s[:r].sqrt() / math.sqrt(self.scale)
        with torch.no_grad():
            self.lora_A.copy_(root[:, None] * vh[:r])
            self.lora_B.copy_(u[:, :r] * root[None, :])
        # The initial factors define the residual base weight; saved so a load can rebuild it.
        self.register_buffer("pissa_A0", self.lora_A.detach().clone())
        self.register_buffer("pissa_B0", self.lora_B.detach().clone())
        self._original_weight = base.weight.detach().clone()
        self._apply_pissa_residual()

    def _apply_pissa_residual(self) -> None:
        base = self.base_module()
        with torch.no_grad():
            residual = self._original_weight - self.scale * (self.pissa_B0 @ self.pissa_A0)
            base.weight.copy_(residual.to(base.weight.dtype))

    def adapter_state_loaded(self) -> None:
        if self._original_weight is not None:
            self._apply_pissa_residual()

    def release(self) -> None:
        """Detach: unmerged, the original W0 comes back; merged, the base already holds the adapted
        weight (residual + s B A), which is what keep_merged asks for."""
        if self._original_weight is not None and not self.merged:
            with torch.no_grad():
                self.base_module().weight.copy_(self._original_weight)

    def disabled_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._original_weight is not None:
            return F.linear(x, self._original_weight, self.base_module().bias)
        return super().disabled_forward(x, *args, **kwargs)

    def passes_input_on_when_off(self) -> bool:
        # PiSSA's base holds W0 - s B0 A0: switched off, the layer runs W0 itself
        return self._original_weight is None and runs_default_off_path(self, LoRALayer)

    # -- one adapter per batch row ----------------------------------------------------------
    def row_form(self) -> RowForm:
        """s B A over the original weight; PiSSA's base holds W0 - s B0 A0, so its form adds -s B0 A0."""
        a, b = self.lora_A, self.scale * self.lora_B
        if self._original_weight is not None:
            a = torch.cat([a, self.pissa_A0])
            b = torch.cat([b, -self.scale * self.pissa_B0], dim=1)
        return RowForm(a=a, b=b)

    def clean_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self._original_weight is not None:
            return self._original_weight
        return super().clean_weight(weight)

    # -- forward / merge --------------------------------------------------------------------
    def _can_fuse(self) -> bool:
        base = self.base_layer
        return (kernels.is_plain_linear(base) and not base.weight.requires_grad
                and (base.bias is None or not base.bias.requires_grad))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        x_dropped = F.dropout(x, self.dropout, True) if self.training and self.dropout > 0 else None
        if (self._can_fuse() and x.dtype == self.lora_A.dtype == self.base_layer.weight.dtype
                and not autocast_active(x)):
            return _FusedLoRA.apply(x, x_dropped, self.base_layer.weight, self.base_layer.bias, self.lora_A,
                                    self.lora_B, self.scale)
        result = self.base_layer(x)
        h = x if x_dropped is None else x_dropped
        update = F.linear(F.linear(h.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return result + (self.scale * update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def weight_with_update(self, below: torch.Tensor) -> torch.Tensor | None:
        return below.to(self.lora_A.dtype) + self.delta_weight()

    def effective_weight(self) -> torch.Tensor | None:
        if self.disabled and self._original_weight is not None:  # switched off, PiSSA runs W0 itself
            return self._original_weight
        return super().effective_weight()

    def merge_into_base(self) -> None:
        add_to_weight(self.base_module(), self.delta_weight())  # NF4 bases requantize
