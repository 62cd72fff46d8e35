"""NF4 base weights, shared by every method that takes `quantize="nf4"` (QLoRA, QDoRA, QPaCA).

`NF4Linear` is a frozen linear whose weight is stored as bitsandbytes 4-bit NormalFloat codes
with one scale per block of 64 weights; with double quantization (the default) those scales are
themselves stored in 8 bits. The whole quantized state lives in one uint8 buffer, `weight`:
device moves never cast it, `model.half()` leaves it alone, and backing it up or restoring it
(merge / unmerge) is a single tensor copy.

Its forward dequantizes the weight, multiplies, and lets the dense copy go; the backward
dequantizes again for dX, so no full-size dense weight stays alive between the two.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import LeantuneError

QUANTIZE_CHOICES = (None, "nf4")
BLOCKSIZE = 64
_NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the double-quantized scales
_ALIGN = 16  # byte alignment of each section of the packed buffer (float32 views need 4)
_QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16)


def _bnb_functional() -> Any:
    """bitsandbytes.functional, imported on first use (its import is slow and logs CPU-kernel notices)."""
    try:
        with _quiet_logger("bitsandbytes"):
            import bitsandbytes.functional as bnb_functional  # optional: the 'quant' extra brings it
    except ImportError as err:
        raise LeantuneError(f"quantize='nf4' needs bitsandbytes (pip install bitsandbytes): {err}") from None
    return bnb_functional


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Section(NamedTuple):
    name: str
    offset: int  # bytes
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _quantize(dense: torch.Tensor, double_quant: bool) -> dict[str, torch.Tensor]:
    """The tensors that make up an NF4 weight: codes, scales, and (double quant) the scales' state."""
    bnb = _bnb_functional()
    source = dense.detach()
    if source.dtype not in _QUANTIZABLE:
        source = source.float()
    packed, state = bnb.quantize_4bit(source.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                      quant_type="nf4")
    parts = {"codes": packed.reshape(-1), "absmax": state.absmax.reshape(-1)}
    if double_quant:
        if not torch.equal(state.state2.code.float(), _nested_code(packed.device)):
            raise RuntimeError("bitsandbytes double-quantized the scales with an unexpected code")
        parts["nested_absmax"] = state.state2.absmax.reshape(-1).float()
        parts["offset"] = torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device).reshape(1)
    return parts


def _layout(parts: dict[str, torch.Tensor]) -> tuple[tuple[_Section, ...], int]:
    sections, offset = [], 0
    for name, tensor in parts.items():
        sections.append(_Section(name, offset, tensor.numel(), tensor.dtype))
        offset += math.ceil(sections[-1].nbytes / _ALIGN) * _ALIGN
    return tuple(sections), offset


_NESTED_CODES: dict[torch.device, torch.Tensor] = {}


def _nested_code(device: torch.device) -> torch.Tensor:
    """The 8-bit code of the double-quantized scales: bitsandbytes' signed dynamic map, the same for
    every layer, so it is rebuilt here rather than stored with each weight."""
    if device not in _NESTED_CODES:
        _NESTED_CODES[device] = _bnb_functional().create_dynamic_map(signed=True).float().to(device)
    return _NESTED_CODES[device]


def _nested_scales(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Double quantization: block scales = code[8-bit value] × scale of their group of 256, + offset."""
    scales = _nested_code(parts["absmax"].device)[parts["absmax"].long()]
    count = scales.numel()
    padded = F.pad(scales, (0, -count % _NESTED_BLOCKSIZE)).view(-1, _NESTED_BLOCKSIZE)
    return padded.mul_(parts["nested_absmax"].view(-1, 1)).view(-1)[:count].add_(parts["offset"])


class NF4Linear(nn.Module):
    """A frozen nn.Linear stand-in with a 4-bit NF4 weight (bias kept as is)."""

    def __init__(self, linear: nn.Linear, double_quant: bool = True):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.double_quant = double_quant
        self.dtype = linear.weight.dtype  # what dequantize_weight returns
        parts = _quantize(linear.weight, double_quant)
        self._quant_dtype = linear.weight.dtype if linear.weight.dtype in _QUANTIZABLE else torch.float32
        self._sections, size = _layout(parts)
        self.register_buffer("weight", torch.zeros(size, dtype=torch.uint8, device=linear.weight.device))
        self._write(parts)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    # -- the packed buffer ---------------------------------------------------------------
    def _view(self, section: _Section) -> torch.Tensor:
        return self.weight[section.offset:section.offset + section.nbytes].view(section.dtype)

    def _parts(self) -> dict[str, torch.Tensor]:
        return {s.name: self._view(s) for s in self._sections}

    def _write(self, parts: dict[str, torch.Tensor]) -> None:
        for section in self._sections:
            tensor = parts[section.name]
            if tensor.numel() != section.numel or tensor.dtype != section.dtype:
                raise RuntimeError(f"NF4 section '{section.name}' changed shape on requantization")
            self._view(section).copy_(tensor.reshape(-1))

    def quantize_(self, dense: torch.Tensor) -> None:
        """Replace the stored weight with the NF4 quantization of `dense` (out × in), in place."""
        if tuple(dense.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expected a {self.out_features}x{self.in_features} weight, got {tuple(dense.shape)}")
        with torch.no_grad():
            self._write(_quantize(dense.to(self._quant_dtype), self.double_quant))

    def dequantize_weight(self) -> torch.Tensor:
        """A fresh dense (out × in) copy of the weight, in the dtype of the original linear."""
        _bnb_functional()  # registers the bitsandbytes kernels
        parts = self._parts()
        scales = _nested_scales(parts) if self.double_quant else parts["absmax"]
        shape = (self.out_features, self.in_features)
        dense = torch.ops.bitsandbytes.dequantize_4bit.default(
            parts["codes"].view(-1, 1), scales, BLOCKSIZE, "nf4", shape, self._quant_dtype)
        return dense if dense.dtype == self.dtype else dense.to(self.dtype)

    def add_to_weight_(self, delta: torch.Tensor) -> None:
        """Merge: dequantize, add `delta`, requantize (lossy, as any write into a 4-bit weight is)."""
        self.quantize_(self.dequantize_weight() + delta.to(self.dtype))

    def dense_numel(self) -> int:
        """Parameters a dense nn.Linear of this shape would hold (for base-weight byte reports)."""
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)

    def to_dense(self) -> nn.Linear:
        """An nn.Linear holding the dequantized weight (the 4-bit values, not the original ones)."""
        return dense_linear(self.dequantize_weight(), self.bias, self.dtype)

    # -- module plumbing -----------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        # The packed buffer is uint8, so casts skip it; follow them for the dense dtype we return.
        super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.weight.device)).dtype
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if not needs_grad:
            return kernels.linear(x, self.dequantize_weight().to(x.dtype), _cast(self.bias, x.dtype))
        return _NF4Matmul.apply(x, self.bias, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.dtype}, double_quant={self.double_quant}")


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear in `dtype` holding a dense copy of `weight` (out × in) and `bias`: what a
    packed base (NF4, sketch) becomes when it is unpacked for good."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """x Wᵀ + b with W dequantized in forward and again in backward (nothing dense is saved)."""

    @staticmethod
    def forward(ctx, x, bias, module):
        ctx.module = module
        ctx.version = module.weight._version
        return kernels.linear(x, module.dequantize_weight().to(x.dtype), _cast(bias, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        module = ctx.module
        if module.weight._version != ctx.version:
            raise RuntimeError("an NF4 weight was requantized (merged) between forward and backward")
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = kernels.matmul(grad_out, module.dequantize_weight().to(grad_out.dtype))
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(module.bias.dtype)
        return grad_x, grad_bias, None


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, NF4Linear)


def quantize_base(name: str, module: nn.Module, quantize: str | None) -> nn.Module:
    """The module an adapter should wrap: `module` itself, or its NF4 replacement for quantize='nf4'."""
    if quantize is None:
        return module
    if quantize not in QUANTIZE_CHOICES:
        raise LeantuneError(f"quantize must be one of {', '.join(map(repr, QUANTIZE_CHOICES))}, got {quantize!r}")
    base_module = getattr(module, "base_module", None)
    inner = base_module() if callable(base_module) else module
    if isinstance(inner, NF4Linear):
        return module  # already quantized by an adapter attached earlier
    if inner is not module:
        raise LeantuneError(f"cannot quantize '{name}': an adapter attached earlier wraps it at full precision")
    if not kernels.is_plain_linear(module):
        raise LeantuneError(f"quantize='nf4' applies to nn.Linear modules; '{name}' is a {type(module).__name__}")
    return NF4Linear(module)
