"""PaCA: fine-tune r randomly chosen input columns of each targeted weight, in place.

The trainable tensor is a delta Δ (out × r), zero at the start. The effective weight is W0 with
columns I replaced by W0[:, I] + (alpha / r)·Δ, so the forward is one matmul over it, with no
adapter branch. Those columns are written into the base weight when Δ changes (an O(out × r)
write), and the backward saves only X[..., I]: dX = G·W_eff and dΔ = (alpha / r)·Gᵀ·X_I.

Several PaCA adapters may sit on one linear. Their column sets may overlap, so the columns are
owned by a `_ColumnLedger` shared by the whole stack: it keeps the original values of every
column any of them selected (exact restore for unmerge / disabled / detach) and knows which
contributions the weight holds right now. On an NF4 base (QPaCA) the ledger keeps the adapted
columns in full precision and places them into the freshly dequantized weight at every use.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeantuneError
from ..quant import QUANTIZE_CHOICES
from .base import (AdapterLayer, MethodConfig, adapter_dtype, autocast_active, dense_weight, one_cpu_thread,
                   register)


@register
@dataclass
class PaCA(MethodConfig):
    method_name: ClassVar[str] = "paca"

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
            self._ledger: _ColumnLedger | None = base_layer._ledger
        elif isinstance(base_layer, AdapterLayer):
            self._ledger = None
        else:
            self._ledger = _ColumnLedger(base_layer)
        if self._ledger is not None:
            self._ledger.join(self)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._ledger is None:
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
        if autocast_active(x):  # the fused matmul keeps one dtype: this layer runs in full precision
            with torch.autocast(x.device.type, enabled=False):
                return self.adapted_forward(x.to(self.paca_delta.dtype), *args, **kwargs)
        plan = self._ledger.plan(self)
        bias = self._ledger.base.bias
        trainable = any(d.requires_grad for d in plan.deltas)
        if not torch.is_grad_enabled() or not (trainable or x.requires_grad or (bias is not None and bias.requires_grad)):
            return F.linear(x, plan.weight(), bias)
        return _PaCAMatmul.apply(x, bias, plan, *plan.deltas)

    # -- merge / unmerge / detach -------------------------------------------------------------
    def merge(self) -> None:
        if self._ledger is None:
            return super().merge()
        if not self.merged:
            self._merged_delta = self.paca_delta.detach().clone()
            self._merge_generation = next(_merge_generations)
            self.merged = True
            self._ledger.sync_base()

    def unmerge(self) -> None:
        if self._ledger is None:
            return super().unmerge()
        if self.merged:
            self.merged = False
            self._merged_delta = None
            self._ledger.sync_base()

    def merge_into_base(self) -> None:
        """Only used on top of another method: add the scattered delta to the innermost weight."""
        from .base import add_to_weight

        base = self.base_module()
        delta = torch.zeros(self.out_features, self.in_features, dtype=self.paca_delta.dtype, device=self.paca_delta.device)
        delta.index_copy_(1, self.paca_index, self.scale * self.paca_delta.detach())
        add_to_weight(base, delta)

    def release(self) -> None:
        if self._ledger is not None:
            self._ledger.leave(self, keep=self.merged)
            self._ledger = None

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


class _Plan:
    """What one adapted forward used: the contributions in the weight (the live deltas' values as
    placed), and the live deltas to train."""

    __slots__ = ("ledger", "key", "values", "live", "merged", "deltas", "gather", "positions", "scales")

    def __init__(self, ledger: "_ColumnLedger", live: list[PaCALayer], merged: list[PaCALayer], key: tuple,
                 values: tuple[torch.Tensor, ...]):
        self.ledger = ledger
        self.live, self.merged = live, merged
        self.key, self.values = key, values
        self.deltas = [layer.paca_delta for layer in live]
        self.scales = [layer.scale for layer in live]
        if len(live) == 1:  # the common case: save exactly X[..., I]
            self.gather, self.positions = live[0].paca_index, None
        else:
            self.gather = ledger.index
            self.positions = [ledger.positions(layer) for layer in live]

    def ensure(self) -> None:
        """Put back the columns this plan's forward used if anything (a disabled forward, a changed
        Δ and the forward that followed) replaced them: backward differentiates that forward."""
        if self.ledger.placed_key != self.key or self.ledger.placed_values is not self.values:
            self.ledger.place(self.live, self.merged, self.key, self.values)

    def weight(self) -> torch.Tensor:
        return self.ledger.effective_weight()


class _PaCAMatmul(torch.autograd.Function):
    """y = x W_effᵀ + b, saving only x[..., I]; W_eff is read from the base, never saved."""

    @staticmethod
    def forward(ctx, x, bias, plan, *deltas):
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, plan.weight(), bias)
        ctx.plan = plan
        ctx.x_shape = x.shape
        if any(ctx.needs_input_grad[3:]):
            ctx.save_for_backward(x2.index_select(1, plan.gather))
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        plan = ctx.plan
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            plan.ensure()
            grad_x = (g2 @ plan.weight()).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_bias = g2.sum(0)
        grad_deltas = []
        if any(ctx.needs_input_grad[3:]):
            (x_cols,) = ctx.saved_tensors
            for i, delta in enumerate(plan.deltas):
                if not ctx.needs_input_grad[3 + i]:
                    grad_deltas.append(None)
                    continue
                cols = x_cols if plan.positions is None else x_cols.index_select(1, plan.positions[i])
                grad_deltas.append(_accumulate_grad(g2, cols, plan.scales[i], delta.dtype))
        else:
            grad_deltas = [None] * len(plan.deltas)
        return (grad_x, grad_bias, None, *grad_deltas)


def _accumulate_grad(g2: torch.Tensor, x_cols: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale · Gᵀ X_I summed over all tokens in (at least) float32.

    Computed as (X_Iᵀ G)ᵀ: with r rows the product runs several times faster in that layout."""
    acc = torch.promote_types(dtype, torch.float32)
    grad = torch.mm(x_cols.to(acc).t(), g2.to(acc)).mul_(scale)
    return grad.t().contiguous().to(dtype)


class _ColumnLedger:
    """The PaCA layers stacked on one base linear, the original values of their columns, and
    which contributions those columns hold right now.

    `orig` holds the base columns at `index` (the sorted union of the members' columns) without
    any PaCA contribution. A dense base holds W0 + the placed contributions in its weight; an NF4
    base keeps its packed weight (with merged contributions requantized into it) and the ledger
    keeps the adapted columns in `columns`, placed into each dequantized copy.
    """

    def __init__(self, base: nn.Module):
        self.base = base
        self.quantized = callable(getattr(base, "dequantize_weight", None))
        self.members: list[PaCALayer] = []
        self.index = torch.empty(0, dtype=torch.long)
        self.orig = torch.empty(0)
        self.placed_key: tuple | None = ()  # () = the base columns hold no contribution
        self.placed_values: tuple[torch.Tensor, ...] = ()  # copies of the live deltas as placed
        self.columns: torch.Tensor | None = None  # NF4 base: the placed columns
        self.base_key: tuple = ()  # NF4 base: the merged contributions requantized into the packed weight
        self.pristine: torch.Tensor | None = None  # NF4 base: packed weight before any merge

    # -- membership -----------------------------------------------------------------------
    def join(self, layer: PaCALayer) -> None:
        self._restore_base()
        self.members.append(layer)
        self._capture()

    def leave(self, layer: PaCALayer, keep: bool) -> None:
        """Remove `layer`; with keep, its merged contribution becomes part of the base."""
        if keep and layer.contribution() is not None:
            self._bake(layer)
        self._restore_base()
        self.members.remove(layer)
        self._capture()

    def reindex(self) -> None:
        """A member's columns changed (adapter load): recapture the originals."""
        self._restore_base()
        self._capture()

    def _capture(self) -> None:
        """Read the original columns for the union of the members' indices (base holds no contribution)."""
        weight_device = self.base.weight.device
        if self.members:
            self.index = torch.unique(torch.cat([m.paca_index for m in self.members])).to(weight_device)
        else:
            self.index = torch.empty(0, dtype=torch.long, device=weight_device)
        with torch.no_grad():
            dense = self._pristine_dense()
            self.orig = dense.index_select(1, self.index).clone()
        self.placed_key, self.columns = (), None
        self.sync_base()

    def _pristine_dense(self) -> torch.Tensor:
        if not self.quantized:
            return self.base.weight.detach()
        if self.pristine is not None:
            with _packed(self.base, self.pristine):
                return self.base.dequantize_weight()
        return self.base.dequantize_weight()

    def _restore_base(self) -> None:
        """Remove every contribution, merged ones included: the base is exactly W0 again."""
        with torch.no_grad():
            if self.quantized:
                if self.pristine is not None:
                    self.base.weight.copy_(self.pristine)
                    self.pristine = None
                self.base_key = ()
            elif self.index.numel():
                self._match_device()
                self.base.weight.index_copy_(1, self.index, self.orig.to(self.base.weight.dtype))
        self.placed_key, self.columns = (), None

    def _bake(self, layer: PaCALayer) -> None:
        """Make `layer`'s merged contribution part of the original columns (detach keep_merged)."""
        with torch.no_grad():
            positions = self.positions(layer)
            self.orig = self.orig.clone()
            self.orig.index_add_(1, positions, (layer.scale * layer.contribution()).to(self.orig.dtype))
            if self.quantized:
                dense = self._pristine_dense()
                dense.index_copy_(1, self.index, self.orig.to(dense.dtype))
                self.pristine = None
                self.base.quantize_(dense)
            else:
                self.base.weight.index_copy_(1, self.index, self.orig.to(self.base.weight.dtype))
        self.placed_key, self.base_key, self.columns = (), (), None

    def positions(self, layer: PaCALayer) -> torch.Tensor:
        return torch.searchsorted(self.index, layer.paca_index)

    # -- which contributions, and writing them ------------------------------------------
    @staticmethod
    def state_key(live: list[PaCALayer], merged: list[PaCALayer]) -> tuple:
        """Which contributions: the live members and the merge snapshots (Δ's values are compared apart)."""
        return tuple(id(m) for m in live), tuple(m._merge_generation for m in merged)

    def plan(self, layer: PaCALayer) -> _Plan:
        """Place the columns `layer`'s adapted forward needs: every merged member, plus the live
        (not merged, not disabled) members at or below `layer`.

        Δ's values are compared with the placed copy at every forward (O(out × r), next to the
        matmul's O(tokens × in × out)): writes through `.data`, `copy_` under no_grad or a whole
        new tensor all bypass what a version counter or an optimizer hook would see."""
        below = self.members[:self.members.index(layer) + 1]
        live = [m for m in below if not (m.merged or m.disabled)]
        merged = [m for m in self.members if m.merged]
        key = self.state_key(live, merged)
        if self.placed_key != key or not _same_values(self.placed_values, live):
            self.place(live, merged, key, tuple(m.paca_delta.detach().clone() for m in live))
        return _Plan(self, live, merged, key, self.placed_values)

    def sync_base(self) -> None:
        """Make the base module itself hold exactly W0 plus the merged contributions."""
        merged = [m for m in self.members if m.merged]
        if self.quantized:
            key = tuple(m._merge_generation for m in merged)
            if key != self.base_key:
                self._requantize(merged)
                self.base_key = key
            return
        key = self.state_key([], merged)
        if self.placed_key != key:
            self.place([], merged, key, ())

    def compose(self, live: list[PaCALayer], merged: list[PaCALayer],
                values: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """orig + the scaled contributions (live members at `values`), for all columns at `index`."""
        parts = list(zip(live, values)) + [(m, m.contribution()) for m in merged]
        acc = torch.promote_types(self.orig.dtype, torch.float32)
        if len(parts) == 1 and parts[0][0].r == self.index.numel():  # one member owns every column
            layer, delta = parts[0]
            return torch.add(self.orig.to(acc), delta.to(acc), alpha=layer.scale)
        columns = self.orig.to(acc, copy=True)
        for layer, delta in parts:
            columns.index_add_(1, self.positions(layer), delta.to(acc), alpha=layer.scale)
        return columns

    def place(self, live: list[PaCALayer], merged: list[PaCALayer], key: tuple,
              values: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad(), one_cpu_thread(self.orig.device):
            self._match_device()
            columns = self.compose(live, merged, values)
            if self.quantized:
                self.columns = columns.to(self.base.dtype)
            else:
                self.base.weight.index_copy_(1, self.index, columns.to(self.base.weight.dtype))
        self.placed_key, self.placed_values = key, values

    def _requantize(self, merged: list[PaCALayer]) -> None:
        """NF4 base: merged contributions are requantized into the packed weight; none merged: the exact original."""
        with torch.no_grad():
            if not merged:
                if self.pristine is not None:
                    self.base.weight.copy_(self.pristine)
                    self.pristine = None
                return
            if self.pristine is None:
                self.pristine = self.base.weight.detach().clone()
            dense = self._pristine_dense()
            dense.index_copy_(1, self.index, self.compose([], merged, ()).to(dense.dtype))
            self.base.quantize_(dense)

    def _match_device(self) -> None:
        """Follow the base if the model was moved or cast after attaching."""
        weight = self.base.weight
        dtype = self.base.dtype if self.quantized else weight.dtype
        if self.orig.device != weight.device or self.orig.dtype != dtype:
            self.orig = self.orig.to(device=weight.device, dtype=dtype)
            self.index = self.index.to(weight.device)

    def effective_weight(self) -> torch.Tensor:
        """The dense weight of the current placement (a dense base's own weight; a fresh copy for NF4)."""
        if not self.quantized:
            return self.base.weight
        dense = self.base.dequantize_weight()
        if self.columns is not None:
            dense.index_copy_(1, self.index, self.columns)
        return dense


def _same_values(placed: tuple[torch.Tensor, ...], live: list[PaCALayer]) -> bool:
    """Whether the placed copies still equal the live deltas, value for value."""
    if len(placed) != len(live):
        return False
    for value, layer in zip(placed, live):
        delta = layer.paca_delta
        if (value.shape != delta.shape or value.dtype != delta.dtype or value.device != delta.device
                or not torch.equal(value, delta)):
            return False
    return True


@contextlib.contextmanager
def _packed(module: nn.Module, packed: torch.Tensor):
    """Temporarily swap an NF4 module's packed buffer (to dequantize a saved copy)."""
    current = module.weight
    module.weight = packed
    try:
        yield
    finally:
        module.weight = current
