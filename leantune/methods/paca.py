"""PaCA: fine-tune r randomly chosen input columns of each targeted weight, in place.

The trainable tensor is a delta Δ (out × r), zero at the start. The effective weight is W0 with
columns I replaced by W0[:, I] + (alpha / r)·Δ, so the forward is one matmul over it, with no
adapter branch. Those columns are written into the base weight when Δ changes (an O(out × r)
write), and the backward saves only X[..., I]: dX = G·W_eff and dΔ = (alpha / r)·Gᵀ·X_I.

Which values the selected columns hold at each moment is bookkeeping of its own, kept by a
`ColumnLedger` (paca_columns.py) shared by every PaCA layer stacked on one linear.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import LeantuneError
from ..quant import QUANTIZE_CHOICES
from .base import ModuleMethod, register
from .layer import AdapterLayer, adapter_dtype, add_to_weight, autocast_active
from .rows import RowForm
from .paca_columns import ColumnLedger


@register
@dataclass
class PaCA(ModuleMethod):
    method_name: ClassVar[str] = "paca"
    writes_base_weight: ClassVar[bool] = True  # its columns live in the base weight

    r: int = 16
    alpha: float = 32
    seed: int = 0
    quantize: str | None = None

    def validate(self) -> None:
        super().validate()
        self._require_int("r")
        self._require_number("alpha", low=0, low_open=True)
        self._require_int("seed", minimum=0)
        self._require_choice("quantize", QUANTIZE_CHOICES)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def check_target(self, name: str, module: nn.Module) -> None:
        if self.r > module.in_features:
            raise LeantuneError(f"paca: 'r' = {self.r} is larger than the {module.in_features} input features of '{name}'")

    def wrap(self, name: str, module: nn.Module, adapter_name: str) -> "PaCALayer":
        return PaCALayer(module, adapter_name, self, name)


def choose_columns(in_features: int, r: int, seed: int, module_name: str, device=None) -> torch.Tensor:
    """r sorted column indices, a function of (seed, module name) only: reproducible in any attach order."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(in_features, generator=generator)[:r].sort().values.to(device)


_merge_generations = itertools.count(1)  # tells one merge's snapshot of Δ from the next


class PaCALayer(AdapterLayer):
    method_name: ClassVar[str] = "paca"
    cleans_base_in_place = True  # a plain forward may leave its columns in the base weight
    merged_base_tensors: ClassVar[tuple[str, ...]] = ("weight",)  # used only when stacked on another method

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PaCA, module_name: str):
        super().__init__(base_layer, adapter_name)
        base = self.base_module()
        weight = base.weight
        dtype = adapter_dtype(torch.empty(0, dtype=getattr(base, "dtype", weight.dtype)))
        self.r, self.scale = config.r, config.scale
        self.register_buffer("paca_index", choose_columns(self.in_features, config.r, config.seed, module_name,
                                                          weight.device))
        self.paca_delta = nn.Parameter(torch.zeros(self.out_features, config.r, dtype=dtype, device=weight.device))
        self._merged_delta: torch.Tensor | None = None  # Δ as it was merged
        self._merge_generation = 0
        # Stacked directly on a PaCA layer or a plain/NF4 linear: share (or start) the column ledger.
        # On top of another method the base output is not a single matmul: fall back to adding X_I Δᵀ.
        if isinstance(base_layer, PaCALayer):
            self._ledger: ColumnLedger | None = base_layer._ledger
        elif isinstance(base_layer, AdapterLayer):
            self._ledger = None
        else:
            self._ledger = ColumnLedger(base_layer)
        if self._ledger is not None:
            self._ledger.join(self)

    # -- forward ------------------------------------------------------------------------------
    @torch.compiler.disable  # eager inside compiled blocks, as AdapterLayer.forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._ledger is None or self.router.rows is not None:
            return super().forward(x, *args, **kwargs)
        if self.disabled:
            return self.disabled_forward(x, *args, **kwargs)
        if self.merged:
            return self._base_forward(x, *args, **kwargs)
        return self.adapted_forward(x)

    def disabled_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._ledger is None:
            return self.base_layer(x, *args, **kwargs)
        return self._base_forward(x, *args, **kwargs)

    def row_form(self) -> RowForm:
        """PaCA's exact LoRA form: A selects its columns, B = s Δ."""
        a = torch.zeros(self.r, self.in_features, dtype=self.paca_delta.dtype, device=self.paca_delta.device)
        a[torch.arange(self.r, device=a.device), self.paca_index] = 1.0
        return RowForm(a=a, b=self.scale * self.paca_delta)

    def effective_weight(self) -> torch.Tensor | None:
        if self._ledger is None:  # on top of another method: below + s Δ in its columns
            return super().effective_weight()
        # from the original columns, not the current placement (which is the last forward's)
        return self._ledger.weight_for(self)

    def weight_with_update(self, below: torch.Tensor) -> torch.Tensor | None:
        weight = below.to(self.paca_delta.dtype, copy=True)
        weight.index_add_(1, self.paca_index, self.scale * self.paca_delta)
        return weight

    def clean_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self._ledger is not None and weight is None:
            self._ledger.sync_base()  # unmerged columns out of the base weight
        return super().clean_weight(weight)

    def _base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """This layer's contribution is absent (disabled) or already in the base (merged)."""
        if not isinstance(self.base_layer, PaCALayer):
            self._ledger.sync_base()  # the plain base runs next: only merged columns may be in it
        return self.base_layer(x, *args, **kwargs)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._ledger is None:  # on top of another method: base output + s · X_I Δᵀ
            update = F.linear(x.index_select(-1, self.paca_index).to(self.paca_delta.dtype), self.paca_delta)
            result = self.base_layer(x, *args, **kwargs)
            return result + (self.scale * update).to(result.dtype)
        plan = self._ledger.plan(self)
        bias = self._ledger.base.bias
        trainable = any(d.requires_grad for d in plan.deltas)
        if not torch.is_grad_enabled() or not (trainable or x.requires_grad or (bias is not None and bias.requires_grad)):
            return kernels.linear(x, plan.weight(), bias)  # autocast, when on, casts as for any linear
        # Under autocast the GEMMs run in its dtype, as nn.Linear's would (bfloat16 GEMMs are several
        # times the float32 rate on CPUs with AVX512-BF16); Δ's gradient is summed in float32.
        autocast_dtype = torch.get_autocast_dtype(x.device.type) if autocast_active(x) else None
        return _PaCAMatmul.apply(x, bias, plan, autocast_dtype, *plan.deltas)

    def _apply(self, fn, recurse: bool = True):
        """model.to(dtype / device): the base is cast holding its originals and merged contributions
        only, and the ledger follows, so a cast (and back) is not taken for an outside write."""
        if self._ledger is not None:
            self._ledger.sync_base()
        result = super()._apply(fn, recurse)
        if self._ledger is not None:
            self._ledger.library_wrote()
        return result

    # -- merge / unmerge / detach -------------------------------------------------------------
    def merge(self) -> None:
        if self._ledger is None:
            return super().merge()
        if not self.merged:
            self._merged_delta = self.paca_delta.detach().clone()
            self._merge_generation = next(_merge_generations)
            self.merged = True
            self._ledger.sync_base()
            self.router.layout += 1

    def unmerge(self) -> None:
        if self._ledger is None:
            return super().unmerge()
        if self.merged:
            self.merged = False
            self._merged_delta = None
            self._ledger.sync_base()
            self.router.layout += 1

    def merge_into_base(self) -> None:
        """Only used on top of another method: add the scattered delta to the innermost weight."""
        base = self.base_module()
        delta = torch.zeros(self.out_features, self.in_features, dtype=self.paca_delta.dtype, device=self.paca_delta.device)
        delta.index_copy_(1, self.paca_index, self.scale * self.paca_delta.detach())
        add_to_weight(base, delta)

    def release(self) -> None:
        if self._ledger is not None:
            self._ledger.leave(self, keep=self.merged)
            self._ledger = None

    def keep_weight_unwritten(self) -> None:
        """Add X_I Δᵀ beside the base matmul instead of writing Δ into the base weight's columns: a
        weight sharded over processes (FSDP2) is gathered anew for every forward, so columns written
        into one gathered copy would not last. Same values and gradients; X_I is still all that is saved."""
        self.release()

    def adapter_state_loaded(self) -> None:
        index = self.paca_index
        if (index.numel() != self.r or bool((index < 0).any()) or bool((index >= self.in_features).any())
                or bool((index[1:] <= index[:-1]).any())):
            raise LeantuneError(f"adapter tensor 'paca_index' must hold {self.r} sorted distinct column indices "
                                f"below {self.in_features}")
        if self._ledger is not None:
            self._ledger.reindex()

    def contribution(self) -> torch.Tensor | None:
        """The (out × r) columns this layer adds at `paca_index` when merged, else None."""
        return None if self._merged_delta is None else self._merged_delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale}"


class _PaCAMatmul(torch.autograd.Function):
    """y = x W_effᵀ + b, saving only x[..., I]; W_eff is read from the base, never saved.

    `autocast_dtype` (or None): both GEMMs (y and the input gradient) run with their operands cast
    to it, unless x or the weight is float64 (autocast keeps float64); x's gradient comes back in
    x's dtype."""

    @staticmethod
    def forward(ctx, x, bias, plan, autocast_dtype, *deltas):
        x2 = x.reshape(-1, x.shape[-1])
        weight = plan.weight()  # dequantized once per forward for an NF4 base
        compute_dtype = None if torch.float64 in (x.dtype, weight.dtype) else autocast_dtype
        out = kernels.linear(*_cast(compute_dtype, x2, weight, bias))
        ctx.plan, ctx.compute_dtype = plan, compute_dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if any(ctx.needs_input_grad[4:]):
            ctx.save_for_backward(x2.index_select(1, plan.gather))
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        plan = ctx.plan
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            plan.ensure()
            grad, weight = _cast(ctx.compute_dtype, g2, plan.weight())
            grad_x = kernels.matmul(grad, weight).to(ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_bias = g2.sum(0, dtype=torch.promote_types(g2.dtype, torch.float32)).to(ctx.bias_dtype)
        grad_deltas = []
        if any(ctx.needs_input_grad[4:]):
            (x_cols,) = ctx.saved_tensors
            for i, delta in enumerate(plan.deltas):
                if not ctx.needs_input_grad[4 + i]:
                    grad_deltas.append(None)
                    continue
                cols = x_cols if plan.positions is None else x_cols.index_select(1, plan.positions[i])
                grad_deltas.append(_accumulate_grad(g2, cols, plan.scales[i], delta.dtype))
        else:
            grad_deltas = [None] * len(plan.deltas)
        return (grad_x, grad_bias, None, None, *grad_deltas)


def _cast(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return tensors if dtype is None else tuple(None if t is None else t.to(dtype) for t in tensors)


def _accumulate_grad(g2: torch.Tensor, x_cols: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale · Gᵀ X_I summed over all tokens in (at least) float32.

    Computed as (X_Iᵀ G)ᵀ: with r rows the product runs several times faster in that layout."""
    acc = torch.promote_types(dtype, torch.float32)
    grad = kernels.matmul(x_cols.to(acc).t(), g2.to(acc)).mul_(scale)
    return grad.t().contiguous().to(dtype)
