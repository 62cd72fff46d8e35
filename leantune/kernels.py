"""Float32 matrix products on CPU through oneDNN: the same products as torch's, faster here.

PyTorch sends a CPU float32 `mm`/`linear` to MKL. On the AMD EPYC (AVX-512) this project is
measured on, that ran SmolLM2-135M's projections at 175-200 GFLOP/s for 207 to 2048 rows, while
oneDNN's inner-product primitive (as PyTorch's ideep layer runs it, in every x86 build) ran them at
380-450 GFLOP/s, and the 8-row products of a decode step 1.9x faster
(`benchmarks/gemm_rate.py`, `benchmarks/results/2026-12-07-cpu-gemm/`). Results agree with float64
to float32 rounding. PyTorch has no switch that sends strict float32 matmuls to oneDNN (its
`mkldnn` precision settings allow lower-precision math), so the op is called here.

`linear` and `matmul` take that path for float32 CPU tensors outside autocast when the product is
large enough to repay oneDNN's call (about 15 µs), else torch's own (compiled code reaches it as
the custom op `leantune::linear`); `FastLinear` is an nn.Linear
whose forward (and backward) does the same, and `use_fast_linears(model)` turns a model's plain
nn.Linear modules into it (`lt.load_model` does). `LEANTUNE_GEMM=torch` (or `off`, `0`) turns all
of it off. Tools that look for torch's own ops (`FlopCounterMode`; `quantize_dynamic`, which
matches the exact nn.Linear class) do not see these products: run them under `torch_products()`
or on a model loaded with `fast_linears=False`.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# oneDNN caches up to 1024 primitives, and PyTorch's layer over it (ideep) 1024 more, each keeping
# buffers sized by its row count: with the demo job's batches all of different lengths, they grew
# its peak by 570 MiB (3,357 MiB with both at 64, 4,206 at the defaults; the time the same, 111 s
# against 110 s). 64 holds every shape of a step. Both are read once, at oneDNN's first product.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")

# Products of fewer multiply-adds than this run through torch: measured here, oneDNN's fixed call
# cost made a 1 x 576 x 576 product 1.08x slower, and an 8 x 576 x 576 one 0.67x the time.
MIN_MACS = 1 << 20


@functools.lru_cache(maxsize=None)
def _onednn_op():
    """oneDNN's linear (x Wᵀ + b) where this PyTorch build has it and the user has not opted out."""
    if os.environ.get("LEANTUNE_GEMM", "onednn").strip().lower() in ("torch", "off", "0"):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_held_off = 0  # depth of `torch_products` blocks


def available() -> bool:
    """Whether float32 CPU products may go through oneDNN in this process."""
    return _onednn_op() is not None and torch.backends.mkldnn.enabled and not _held_off


@contextlib.contextmanager
def torch_products() -> Iterator[None]:
    """Every product through torch's own ops inside the block (PyTorch's FLOP counter sees only those)."""
    global _held_off
    _held_off += 1
    try:
        yield
    finally:
        _held_off -= 1


def _plain(t: torch.Tensor) -> bool:
    # tensor subclasses (DTensor, quantized or fake tensors) keep torch's own dispatch
    return type(t) in (torch.Tensor, nn.Parameter) and t.dtype == torch.float32 and t.device.type == "cpu"


def _dense(t: torch.Tensor) -> bool:
    # row-major, or a transposed row-major matrix (what backward passes): oneDNN takes either as it
    # is; other strides (expanded, sliced) are not handed to it
    return t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous())


def _takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether x Wᵀ + b goes through oneDNN (W: out × in)."""
    if not (_plain(x) and _plain(weight) and (bias is None or _plain(bias))):
        return False
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        return False
    if not (_dense(x) and _dense(weight)) or (bias is not None and bias.shape != weight.shape[:1]):
        return False
    if torch.is_autocast_enabled("cpu") or not available():
        return False
    return x.numel() * weight.shape[0] >= MIN_MACS


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b through oneDNN, no autograd; for operands `_takes` accepted."""
    return _onednn_op()(x, weight, bias, "none", [], "")


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b without autograd: oneDNN where it takes it, else torch."""
    return _onednn(x, weight, bias) if _takes(x, weight, bias) else F.linear(x, weight, bias)


class _Linear(torch.autograd.Function):
    """y = x Wᵀ + b with both GEMMs of backward through `_product` too (oneDNN has no autograd).

    Saved: x only when W needs a gradient, W only when x does (W is the parameter itself, no copy);
    what F.linear keeps. Backward is not itself differentiable (oneDNN's op has no autograd): a
    second derivative through it raises instead of silently missing terms."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if needs_w else None, weight if needs_x else None)
        return _onednn(x, weight, bias)  # `linear` checked the operands

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul(g2, weight).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = _product(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)  # Gᵀ X as (Gᵀ)(Xᵀ)ᵀ
        if ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


# Compiled code reaches oneDNN through a custom op: inductor cannot lower `_linear_pointwise` itself
# (its args[5]), but calls a custom op as an opaque kernel and fuses the elementwise work around it.
@torch.library.custom_op("leantune::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x = x if x.is_contiguous() else x.contiguous()
    return _onednn(x, weight if _dense(weight) else weight.contiguous(), bias)


@_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_op_setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)  # compiled graphs keep only what the traced backward reads
    ctx.has_bias = bias is not None


def _linear_op_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    g2 = grad.reshape(-1, grad.shape[-1])
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _linear_op(g2, weight.t(), None).view(*grad.shape[:-1], weight.shape[1])
    if ctx.needs_input_grad[1]:
        grad_w = _linear_op(g2.t(), x.reshape(-1, x.shape[-1]).t(), None)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = g2.sum(0)
    return grad_x, grad_w, grad_b


_linear_op.register_autograd(_linear_op_backward, setup_context=_linear_op_setup)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN where it applies; differentiable either way."""
    if not _takes(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return _Linear.apply(x, weight, bias) if grads else _onednn(x, weight, bias)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a 2-D `b` (a: [..., k], b: [k, n]), through oneDNN where it applies."""
    return linear(a, b.t())


class FastLinear(nn.Linear):
    """An nn.Linear (same parameters, state dict and isinstance) whose products go through `linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear that computes nothing but x Wᵀ + b: the class itself or FastLinear."""
    return type(module) in (nn.Linear, FastLinear)


def use_fast_linears(model: nn.Module) -> int:
    """Turn every module of class exactly nn.Linear into a FastLinear (in place); how many.

    Subclasses with a forward of their own are left alone: only the class changes, so weights,
    hooks, state-dict keys and parameter identities stay what they were."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
            count += 1
    return count
