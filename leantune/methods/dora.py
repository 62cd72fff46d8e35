"""DoRA: W' = m · (W0 + s B A) / ‖W0 + s B A‖_row, a LoRA update plus a trainable per-row magnitude.

The output is y = (m / n) ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ) + b with n the row norms of W0 + s B A.
The norm never forms the dense update: ‖W0 + sBA‖²_row = ‖W0‖²_row + 2s·rowsum((W0 Aᵀ) ⊙ B)
+ s²·rowsum((B A Aᵀ) ⊙ B), which needs only out×r and r×r products. ‖W0‖²_row is kept per layer
and taken again whenever the base weight's storage or version changed (a load_state_dict into the
base, PaCA's columns written into it from below, a `.data =` swap) and at every forward that autograd
records, where it is a pass over W0 next to the step's products; only an in-place write through
`.data` to the base weight between two no-grad forwards goes unseen (a decode step would otherwise
read every weight twice).

Gradient convention: n is treated as a constant in backward (detached), as the DoRA paper
(section 4.3) suggests and as Hugging Face PEFT does, so A and B receive no gradient through n.
The fused autograd function saves x (after dropout, and only while A trains: `freeze_a` keeps A
at its init, as LoRA-FA does), x·Aᵀ (as r × tokens) and one tokens×out tensor for the magnitude
gradient — the layer's own output when it has no bias (the next op usually keeps that tensor
anyway; autograd's version check reports a later in-place edit of it) — and never a weight-sized
tensor: backward fetches W0 again from the base module (quantized bases dequantize again).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import LeantuneError
from .base import register
from .layer import AdapterLayer, autocast_active, dense_weight
from .rows import RowForm, clean_stack_weight, layer_stack, version_of
from .lora import LoRA, LoRALayer


@register
@dataclass
class DoRA(LoRA):
    """LoRA's fields (r, alpha, dropout, rslora, init, quantize, freeze_a) with a learned magnitude per output row."""

    method_name: ClassVar[str] = "dora"

    def wrap(self, name: str, module: nn.Module, adapter_name: str) -> "DoRALayer":
        return DoRALayer(module, adapter_name, self)


def row_norms(weight: torch.Tensor, base_sq_norm: torch.Tensor, lora_a: torch.Tensor,
              lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """‖W0 + s B A‖ per row from ‖W0‖²_row, W0 Aᵀ (out×r) and A Aᵀ (r×r); never builds B A."""
    wa = weight.to(lora_a.dtype) @ lora_a.t()
    bq = lora_b @ (lora_a @ lora_a.t())
    sq = base_sq_norm + 2 * scale * (wa * lora_b).sum(1) + scale * scale * (bq * lora_b).sum(1)
    return sq.clamp_min_(0).sqrt_()


class _FusedDoRA(torch.autograd.Function):
    """y = (m / n) ⊙ (x W0ᵀ + s (xd Aᵀ) Bᵀ) + b for a frozen W0, b; xd is x after LoRA dropout (None: x)."""

    @staticmethod
    def forward(ctx, x, x_dropped, weight, bias, lora_a, lora_b, magnitude,
                get_weight: Callable[[], torch.Tensor], base_sq_norm, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if x_dropped is None else x_dropped.reshape(-1, x.shape[-1])
        xa_t = lora_a @ xd2.t()  # r × tokens: the fast layout for skinny products (see lora.py)
        z = kernels.linear(x2, weight)
        z.addmm_(xa_t.t(), lora_b.t(), alpha=scale)
        norm = row_norms(weight, base_sq_norm, lora_a, lora_b, scale)
        factor = magnitude / norm
        # The magnitude gradient needs z = y / factor (bias-free). Saving y itself costs nothing
        # extra where the next op keeps y too; a bias, or a zero magnitude, makes z unrecoverable.
        keep_output = bias is None and not bool((magnitude == 0).any())
        x_for_grad_a = xd2 if ctx.needs_input_grad[4] else None
        if keep_output:
            out = z.mul_(factor).view(*x.shape[:-1], weight.shape[0])
            ctx.save_for_backward(x_for_grad_a, xa_t, lora_a, lora_b, magnitude, norm, factor, out)
        else:
            out = torch.addcmul(bias, z, factor) if bias is not None else z * factor
            out = out.view(*x.shape[:-1], weight.shape[0])
            ctx.save_for_backward(x_for_grad_a, xa_t, lora_a, lora_b, magnitude, norm, factor, z)
        ctx.keep_output = keep_output
        ctx.get_weight = get_weight
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xd2, xa_t, lora_a, lora_b, magnitude, norm, factor, kept = ctx.saved_tensors
        scale = ctx.scale
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gc = g2 * factor  # gradient at z = x W0ᵀ + s xa Bᵀ
        gb_t = lora_b.t() @ gc.t()  # r × tokens, shared by dX, dXd and dA
        grad_x = grad_xd = grad_a = grad_b = grad_m = None
        if ctx.needs_input_grad[1]:
            grad_xd = (gb_t.t() @ lora_a).mul_(scale).view(ctx.x_shape)
        if ctx.needs_input_grad[0]:
            grad_x = kernels.matmul(gc, ctx.get_weight().to(gc.dtype))
            if grad_xd is None:
                grad_x.addmm_(gb_t.t(), lora_a, alpha=scale)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[4]:
            grad_a = (gb_t @ xd2).mul_(scale)
        if ctx.needs_input_grad[5]:
            grad_b = (xa_t @ gc).mul_(scale).t().contiguous()
        if ctx.needs_input_grad[6]:
            # dL/dm = Σ_t g ⊙ z / n, and z / n = y / m on the bias-free path.
            kept2 = kept.reshape(-1, kept.shape[-1])
            grad_m = (g2 * kept2).sum(0)
            grad_m = grad_m / magnitude if ctx.keep_output else grad_m / norm
        return grad_x, grad_xd, None, None, grad_a, grad_b, grad_m, None, None, None


class DoRALayer(LoRALayer):
    method_name: ClassVar[str] = "dora"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DoRA):
        super().__init__(base_layer, adapter_name, config)
        self._norm_key: tuple | None = None  # the base weight's state base_sq_norm was taken at
        self.register_buffer("base_sq_norm", self._base_sq_norm(), persistent=False)
        self.magnitude = nn.Parameter(self.current_norms().detach().clone())

    def _base_weight(self) -> torch.Tensor:
        """W0: the base weight, or stacked on another adapter, the weight that adapter runs with."""
        if not self._stacked():
            return dense_weight(self.base_module())
        weight = self.base_layer.effective_weight()
        if weight is None:
            raise LeantuneError(f"DoRA adapter '{self.adapter_name}' normalises the weight of what it wraps, but "
                                f"the {self.base_layer.method_name} adapter below it is no single linear map; "
                                "attach DoRA first, or under it")
        return weight

    def _stacked(self) -> bool:
        return isinstance(self.base_layer, AdapterLayer)

    def _stored_weight_key(self) -> tuple:
        stored = self.base_module().weight  # the stored tensor: a quantized base's packed codes
        return id(stored), stored.data_ptr(), version_of(stored), stored.shape, stored.dtype

    def _base_sq_norm(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """‖W0‖²_row of the (possibly PiSSA-residual) base weight, in the adapter dtype."""
        with torch.no_grad():
            self._norm_key = self._stored_weight_key()
            return self._squared_row_norms(self._base_weight() if weight is None else weight)

    def _squared_row_norms(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight.detach().to(self.lora_A.dtype), dim=1).pow_(2)

    def fresh_base_sq_norm(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """‖W0‖²_row for the base weight as it is now (when it is taken again: the module docstring);
        `weight`: the dense base weight, where the caller has it already (a quantized one dequantized)."""
        # stacked on another adapter, W0 moves with that adapter's tensors: taken every time
        if torch.is_grad_enabled() or self._stacked() or self._norm_key != self._stored_weight_key():
            self.base_sq_norm = self._base_sq_norm(weight)
        return self.base_sq_norm

    def current_norms(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """‖W0 + s B A‖_row for the current factors (no gradient flows through it); `weight`: W0
        when it is not the one the layer runs over now."""
        if weight is None:
            weight = self._base_weight()
            base_sq_norm = self.fresh_base_sq_norm(weight)
        else:
            base_sq_norm = self._squared_row_norms(weight)
        with torch.no_grad():
            return row_norms(weight, base_sq_norm, self.lora_A, self.lora_B, self.scale)

    def row_form(self) -> RowForm:
        """m / ‖W0 + s B A‖_row scales the base output and the update; the bias stays as it is. A row
        runs this adapter alone, so W0 is the base weight (cleaned of the adapters below by now)."""
        form = super().row_form()
        form.post = self.magnitude / (self.current_norms(clean_stack_weight(layer_stack(self.base_layer)))
                                      if self._stacked() else self.current_norms())
        return form

    # -- forward / merge --------------------------------------------------------------------
    def _can_fuse(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        base = self.base_layer
        return (not isinstance(base, AdapterLayer) and not weight.requires_grad
                and (base.bias is None or not base.bias.requires_grad)
                and x.dtype == self.lora_A.dtype == weight.dtype
                and not autocast_active(x))  # the fused products would leave autocast's dtype mixed

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        dropping = self.training and self.dropout > 0
        x_dropped = F.dropout(x, self.dropout, True) if dropping else None
        if self._stacked():  # the weight below is built once, for the norms
            return self._plain_forward(x, x if x_dropped is None else x_dropped)
        weight = self._base_weight()  # quantized bases dequantize once here, and again in backward
        if self._can_fuse(x, weight):
            return _FusedDoRA.apply(x, x_dropped, weight, self.base_module().bias, self.lora_A, self.lora_B,
                                    self.magnitude, self._base_weight, self.fresh_base_sq_norm(weight), self.scale)
        return self._plain_forward(x, x if x_dropped is None else x_dropped)

    def _plain_forward(self, x: torch.Tensor, x_dropped: torch.Tensor) -> torch.Tensor:
        """Autograd on ordinary ops: mixed dtypes, a trainable base, or a wrapped adapter below."""
        base = self.base_module()
        result = self.base_layer(x)
        bias = base.bias
        if bias is not None and self._stacked():  # the bias the layers below give (IA3 may scale it)
            bias = self.base_layer(x.new_zeros(1, x.shape[-1]))[0]
        z = result - bias if bias is not None else result
        lora_out = F.linear(F.linear(x_dropped.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        factor = self.magnitude / self.current_norms()
        scaled = factor * (z.to(factor.dtype) + self.scale * lora_out)
        if bias is not None:
            scaled = scaled + bias.to(scaled.dtype)
        return scaled.to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W' = m · (W0 + s B A) / ‖W0 + s B A‖_row, in the adapter dtype."""
        combined = self._base_weight().to(self.lora_A.dtype) + self.scale * (self.lora_B @ self.lora_A)
        return (self.magnitude / self.current_norms())[:, None] * combined

    def delta_weight(self) -> torch.Tensor:
        """W' - W0: what LoRALayer.merge_into_base adds to the base weight."""
        return self.merged_weight() - self._base_weight().to(self.lora_A.dtype)
