"""Sketched linears: Ŵ[i, j] = tables[i, g(j), codes[i, j]], rebuilt on the fly; only the tables train.

`SketchedLinear` is the frozen base (packed codes, the fitted tables, the original bias): it stands
in for the dense nn.Linear, whose weight is dropped. `SketchLayer` is the adapter around it, with
trainable float32 tables. The autograd function rebuilds Ŵ in forward and again in backward and
saves only the input: the table gradient is Gᵀ X (over flattened tokens) scattered into the table
entries by code.
"""
from __future__ import annotations

import torch
from torch import nn

from ... import kernels
from ...quant import dense_linear
from ..layer import AdapterLayer
from .pack import LayerSketch, rebuild_weight, unpack_codes


class SketchLinearFunction(torch.autograd.Function):
    """y = x Ŵᵀ + b with Ŵ = tables gathered by codes; never keeps a dense Ŵ between passes."""

    @staticmethod
    def forward(ctx, x, packed_codes, tables, bias):
        x2 = x.reshape(-1, x.shape[-1])
        weight = rebuild_weight(unpack_codes(packed_codes).long(), tables).to(x.dtype)
        out = kernels.linear(x2, weight, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x2 if ctx.needs_input_grad[2] else None, packed_codes, tables)
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2, packed_codes, tables = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        codes = unpack_codes(packed_codes).long()
        grad_x = grad_tables = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = kernels.matmul(g2, rebuild_weight(codes, tables).to(g2.dtype)).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            out_features, groups, _ = tables.shape
            grad_weight = kernels.matmul(g2.t(), x2.to(g2.dtype)).to(tables.dtype)
            grad_tables = torch.zeros_like(tables).scatter_add_(
                2, codes.view(out_features, groups, -1), grad_weight.view(out_features, groups, -1))
        if ctx.needs_input_grad[3]:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_tables, grad_bias


def sketch_linear(x: torch.Tensor, packed_codes: torch.Tensor, tables: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    return SketchLinearFunction.apply(x, packed_codes, tables, bias)


class SketchedLinear(nn.Module):
    """The frozen sketched base of one linear: packed codes + fitted tables + the original bias."""

    def __init__(self, sketch: LayerSketch, bias: nn.Parameter | None, dense_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = sketch.in_features
        self.out_features = sketch.out_features
        self.dense_dtype = dense_dtype  # the dtype of the weight it replaced, for `to_dense`
        self.register_buffer("codes", sketch.packed_codes)
        self.register_buffer("tables", sketch.tables)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sketch_linear(x, self.codes, self.tables, self.bias)

    def dequantize_weight(self) -> torch.Tensor:
        """The dense Ŵ (float32), built on demand."""
        return rebuild_weight(unpack_codes(self.codes).long(), self.tables.float())

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of Ŵ for code that reads `.weight`; it is rebuilt on every access."""
        return self.dequantize_weight()

    def dense_numel(self) -> int:
        """Parameters of the dense linear this stands for (weight and bias), for size reports."""
        return self.in_features * self.out_features + (self.bias.numel() if self.bias is not None else 0)

    def to_dense(self) -> nn.Linear:
        return dense_linear(self.dequantize_weight(), self.bias, self.dense_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.tables.shape[1]}, " \
               f"entries={self.tables.shape[2]}"


class SketchLayer(AdapterLayer):
    """Trainable tables over a `SketchedLinear`; disabled = the fitted tables, merge = tables into the base."""

    method_name = "sketchtune"

    merged_base_tensors = ("tables",)

    def __init__(self, base_layer: SketchedLinear, adapter_name: str, dtype: torch.dtype = torch.float32):
        super().__init__(base_layer, adapter_name)
        self.tables = nn.Parameter(base_layer.tables.detach().to(dtype).clone())

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return sketch_linear(x, base.codes, self.tables, base.bias)

    def dequantize_weight(self) -> torch.Tensor:
        return rebuild_weight(unpack_codes(self.base_layer.codes).long(), self.tables.detach())

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize_weight()

    # The base keeps its tables in the sketch's storage dtype: merging swaps in a float32 copy of
    # the trained tables and unmerging puts the very same fitted tensor back (exact, no drift).
    def merge(self) -> None:
        if self.merged:
            return
        self._merge_backup = {"tables": self.base_layer.tables}
        self.base_layer.tables = self.tables.detach().clone()
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.tables = self._merge_backup.pop("tables")
        self.merged = False

    def release(self) -> None:
        """On detach the base becomes a dense nn.Linear (fitted tables, or trained ones if kept merged)."""
        self.base_layer = self.base_layer.to_dense()
