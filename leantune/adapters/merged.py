"""Merged export: any adapter folded into (a copy of) its base, written as a plain Hugging Face model folder."""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..errors import LeantuneError
from ..files import atomic_directory
from ..methods.targets import replace_module
from ..quant import is_quantized
from .native import attach_with_state


def save_merged_model(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None,
                      in_place: bool = False) -> Path:
    """Fold the adapters a plain forward runs into the base and write a plain Hugging Face model folder
    (atomically); adapters `lt.use` left out are dropped, so the folder computes what the model does.

    NF4 and sketched bases become dense first (their rounded values), so the merge adds each
    update in full precision instead of rounding it back into 4 bits. The model is left as it was
    (the merge runs on a copy) unless in_place=True, which saves that copy's memory and leaves the
    model detached with the merged weights, like PEFT's merge_and_unload.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise LeantuneError(f"a merged export needs a Hugging Face model (with save_pretrained), got {type(model).__name__}")
    api.refuse_unmergeable(model, [name for name in api.attached(model) if api.router(model).runs(name)])
    if not in_place:
        model = copy.deepcopy(model)
    for name in [name for name in api.attached(model) if not api.router(model).runs(name)]:
        api.detach(model, name)
    _dequantize_bases(model)
    if api.attached(model):
        api.detach(model, keep_merged=True)
    _check_architecture_holds(model)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def _check_architecture_holds(model: nn.Module) -> None:
    """The merged tensors must be what the model's own config builds (e.g. no biases it lacks)."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    extra = sorted(set(model.state_dict()) - set(fresh.state_dict()))
    if extra:
        raise LeantuneError(f"the merged model holds '{extra[0]}', which the {type(model).__name__} config does not "
                            "build (e.g. biases added by bitfit add_bias=True); export the adapter instead")


def _dequantize_bases(model: nn.Module) -> None:
    """Swap NF4 bases for dense linears under every adapter, re-attaching the adapters exactly."""
    if not any(is_quantized(module) for module in model.modules()):
        return
    saved = [(name, config, config.state_dict(model, name)) for name, config in api.attached(model).items()]
    if saved:
        api.detach(model)  # exact: every base back to what attach found (NF4 stays NF4)
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            replace_module(model, name, module.to_dense())
    for name, config, state in saved:
        attach_with_state(model, dataclasses.replace(config, quantize=None) if hasattr(config, "quantize") else config,
                          name, state)
