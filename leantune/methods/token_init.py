"""Which vocabulary tokens start a method's virtual tokens: random rows, or a text's own tokens.

Prompt tuning copies these tokens' embeddings; prefix tuning runs the model on them and keeps each
layer's keys and values. Both draw "vocab" ids from their `seed` and tokenise "text" with the
model's own tokenizer (loaded by the model's name), repeated or cut to the virtual-token count.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LeantuneError
from ..models import load_tokenizer

INITS = ("random", "text", "vocab")


def validate_init(method_name: str, init: str, init_text: str | None) -> None:
    if init not in INITS:
        raise LeantuneError(f"{method_name}: 'init' must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if init == "text" and (not isinstance(init_text, str) or not init_text):
        raise LeantuneError(f"{method_name}: init='text' needs 'init_text', the text whose tokens start the virtual "
                            f"tokens, got {init_text!r}")
    if init != "text" and init_text is not None:
        raise LeantuneError(f"{method_name}: 'init_text' is only read with init='text', got init={init!r}")


def init_token_ids(method_name: str, init: str, init_text: str | None, count: int, seed: int,
                   model: nn.Module, vocab_size: int) -> torch.Tensor:
    """`count` token ids for init "vocab" or "text" (CPU, int64)."""
    if init == "vocab":
        return torch.randint(0, vocab_size, (count,), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(_text_ids(method_name, init_text, count, model, vocab_size))


def _text_ids(method_name: str, text: str, count: int, model: nn.Module, vocab_size: int) -> list[int]:
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise LeantuneError(f"{method_name}: init='text' embeds init_text with the model's tokenizer, and this model "
                            "has no name to load it by; use init='random' or init='vocab'")
    try:
        tokenizer = load_tokenizer(name)
    except LeantuneError as err:
        raise LeantuneError(f"{method_name}: init='text' needs the tokenizer of '{name}' to embed init_text ({err})") from None
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise LeantuneError(f"{method_name}: init_text {text!r} has no tokens")
    if max(ids) >= vocab_size:
        raise LeantuneError(f"{method_name}: init_text has token id {max(ids)}, beyond the model's {vocab_size} "
                            "embeddings")
    return (ids * math.ceil(count / len(ids)))[:count]
