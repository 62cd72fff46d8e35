"""Fewer elementwise passes around the projections: RMSNorm and SwiGLU as autograd functions.

`fuse_norms_and_mlps(model)` gives each RMSNorm and each gated-SiLU MLP of a `transformers` model
a forward that computes the same function (float32, within rounding) with fewer passes over the
activations and fewer tensors kept for backward. It changes how the model computes, not what: an
MLP is switched only if its class's forward is exactly down(act(gate(x)) · up(x)) (no clamp, no
dropout), and each module is checked against its own forward on random inputs of two scales, so
one that computes something else (Gemma's 1 + weight, a GELU MLP) keeps its own forward. Other
dtypes and autocast run the module's own forward too: the fused kernels are float32 ones here.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import types

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNorm(torch.autograd.Function):
    """y = x · rstd · w with rstd = 1/√(mean(x²) + ε) over the last dimension.

    Forward is PyTorch's one-pass `_fused_rms_norm` kernel; autograd over the Hugging Face module
    makes six passes forward and about ten back. Saved: x (which Hugging Face's module keeps too)
    and rstd, one value per token. Backward, with g' = g · w:
        dx = rstd · g' − x · rstd³ · mean(g' · x),   dw = Σ_tokens g · x · rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        scaled = grad * weight
        mean_dot = (scaled * x).sum(-1, keepdim=True).div_(x.shape[-1])
        dx = torch.addcmul(scaled.mul_(rstd), x, mean_dot.mul_(rstd.pow(3)), value=-1)
        dw = (grad * x * rstd).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) · up, keeping gate and up for backward (autograd also keeps silu(gate), a third
    tensor of the MLP's width per token; backward recomputes it instead)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return d_gate, d_up


def _runs_fused(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device == weight.device
            and not torch.is_autocast_enabled(x.device.type))


def _fused_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not _runs_fused(hidden_states, self.weight):
        return type(self).forward(self, hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, _epsilon(self))


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype != torch.float32 or up.dtype != torch.float32:
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(_SiluMul.apply(gate, up))


def _epsilon(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and (hasattr(module, "variance_epsilon") or hasattr(module, "eps")))


_GATED = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


def _is_gated_mlp(module: nn.Module) -> bool:
    """gate_proj, up_proj, down_proj and act_fn, and a forward that is that one expression and nothing
    else: clamped or dropout variants compute something a random-input check may not reveal."""
    if not all(isinstance(getattr(module, name, None), nn.Module)
               for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(type(module).forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    if not isinstance(function, ast.FunctionDef) or len(function.args.args) != 2:
        return False
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    x = function.args.args[1].arg
    expected = ast.dump(ast.parse(_GATED.replace("(x)", f"({x})"), mode="eval").body)
    if len(body) == 1 and isinstance(body[0], ast.Return):
        return body[0].value is not None and ast.dump(body[0].value) == expected
    return (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
            and isinstance(body[0].targets[0], ast.Name) and ast.dump(body[0].value) == expected
            and isinstance(body[1], ast.Return) and isinstance(body[1].value, ast.Name)
            and body[1].value.id == body[0].targets[0].id)


@torch.no_grad()
def _same_function(module: nn.Module, fused, width: int) -> bool:
    """Whether `fused` computes what the module's own forward does, on a random float32 input."""
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.dtype != torch.float32 or parameter.is_meta:
        return False
    generator = torch.Generator().manual_seed(0)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()  # adapter dropout off: both forwards must see the same projections
    try:
        for scale in (1.0, 30.0):  # the larger one reaches clamps and saturations the first may not
            x = (scale * torch.randn(3, width, generator=generator)).to(parameter.device)
            expected = type(module).forward(module, x)
            if not torch.allclose(fused(module, x), expected, rtol=1e-4, atol=1e-5 * scale * scale):
                return False
        return True
    except Exception:  # a module of that name and shape that computes something else: keep its forward
        return False
    finally:
        for m, training in modes:
            m.training = training


def fuse_norms_and_mlps(model: nn.Module) -> int:
    """Switch every RMSNorm and gated-SiLU MLP of `model` that computes the same function to the
    fused forward; return how many modules were switched. `unfuse` undoes it (and is needed before
    pickling the whole model: a bound method does not pickle; a partial would, but `torch.compile`
    then guards on each module and compiles one graph per decoder block instead of one for all)."""
    switched = 0
    for module in model.modules():
        if "forward" in module.__dict__:
            continue  # already switched (or given its own forward by someone else)
        if _is_rms_norm(module) and _same_function(module, _fused_norm_forward, module.weight.shape[0]):
            module.forward = types.MethodType(_fused_norm_forward, module)
        elif _is_gated_mlp(module) and _same_function(module, _fused_mlp_forward, _in_width(module)):
            module.forward = types.MethodType(_fused_mlp_forward, module)
        else:
            continue
        switched += 1
    return switched


def unfuse(model: nn.Module) -> None:
    """Every module back to its class's own forward."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) in (_fused_norm_forward, _fused_mlp_forward):
            del module.forward


def _in_width(mlp: nn.Module) -> int:
    projection = mlp.gate_proj
    width = getattr(projection, "in_features", None)
    return width if width is not None else projection.weight.shape[-1]
