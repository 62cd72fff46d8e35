"""AdamW with decay only where it belongs, and the learning-rate schedule as a pure function of the step."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LeantuneError

_NO_DECAY_NAMES = ("bias", "norm")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed and undecayed groups (biases, norms, any 1-D tensor)."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        lowered = name.lower()
        if param.ndim < 2 or any(word in lowered for word in _NO_DECAY_NAMES):
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    if not decay and not no_decay:
        raise LeantuneError("the model has no trainable parameters: the method attached nothing to train")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    # AdamW keeps extra keys of a group (here: "names") in its state_dict, which checkpoints use to check identity.
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=tuple(betas))


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`warmup` >= 1 is a step count; below 1 a fraction of `total_steps`."""
    return int(warmup) if warmup >= 1 else int(round(warmup * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise LeantuneError(f"unknown schedule '{schedule}'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
