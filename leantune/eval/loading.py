"""The model a companion command (`leantune eval`, `leantune generate`) runs: a base model plus,
optionally, a saved adapter. The base model is the adapter's recorded `base_model` unless named."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..adapters import load_adapter, read_adapter_config
from ..errors import LeantuneError
from ..models import load_model, load_tokenizer


def load_for_inference(adapter: str | None, model_name: str | None) -> tuple[nn.Module, Any]:
    """(model in eval mode with the adapter attached, tokenizer)."""
    if adapter is None and model_name is None:
        raise LeantuneError("name what to run: --adapter DIR (a saved adapter) and/or --model NAME")
    name = model_name
    if adapter is not None:
        document = read_adapter_config(adapter)
        name = name or document.get("base_model")
        if not name:
            raise LeantuneError(f"adapter '{adapter}' does not record its base model; pass --model NAME")
    tokenizer = load_tokenizer(name)
    model = load_model(name)
    if adapter is not None:
        load_adapter(model, adapter)
    return model.eval(), tokenizer
