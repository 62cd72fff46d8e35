"""Input Hessians H = XᵀX / N of linear layers and the factors the error-feedback sweep needs."""
from __future__ import annotations

import torch

from ...errors import LeantuneError


class HessianAccumulator:
    """Accumulates XᵀX over calibration tokens in float64 (each batch's product in its own dtype)."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1])
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        self.sum += (x.t() @ x).double()
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise LeantuneError("no calibration tokens reached this layer")
        return self.sum / self.count


def dead_columns(hessian: torch.Tensor) -> torch.Tensor:
    """Input features that were zero on every calibration token (they carry no signal)."""
    return torch.diagonal(hessian) == 0


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp · mean(diag H) · I, with dead inputs given a unit diagonal so H stays invertible."""
    result = hessian.clone()
    diagonal = torch.diagonal(result)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    live = diagonal[~dead]
    scale = live.mean() if live.numel() else diagonal.new_tensor(1.0)
    diagonal += damp * scale
    return result


def inverse_cholesky_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper-triangular U with H⁻¹ = Uᵀ U, for the damped H; more damping if H is numerically singular."""
    for attempt in range(6):
        factor, info = torch.linalg.cholesky_ex(damped(hessian, damp * 10 ** attempt))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise LeantuneError("the calibration Hessian is not positive definite even with heavy damping; raise 'damp'")


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖ / ‖WX‖ over the calibration tokens, from H = XᵀX / N (no X needed)."""
    weight, delta = weight.double(), weight.double() - approx.double()
    error = ((delta @ hessian) * delta).sum()
    reference = ((weight @ hessian) * weight).sum()
    return float((error.clamp_min(0) / reference).sqrt()) if reference > 0 else 0.0
