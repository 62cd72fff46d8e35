"""Prompt tuning: trainable virtual-token embeddings put in front of every input.

`PromptTuning(num_virtual_tokens=20)` trains one (num_virtual_tokens × hidden) matrix P and nothing
else. It acts on the decoder body (`model.get_decoder()`), so the top-level forward and its
`labels=` loss, `model.generate` and leantune's chunked loss (which calls the decoder itself) all
run it the same way:

- a forward pre-hook turns `input_ids` into `inputs_embeds` with P in front, extends a 2-D
  attention mask with ones and, when position ids are given, gives the virtual tokens 0..V-1 and
  moves the real ones up by V (without them the model counts 0..V+T-1, the same thing unpadded;
  rows that start with padding are counted from their first real token, so no pad sits between
  the virtual tokens and the text);
- a forward hook cuts the virtual positions off `last_hidden_state` (and `hidden_states`), so the
  head, the logits, the labels and every loss cover exactly the real tokens.

The first real token is therefore not predicted, as without the adapter: a loss counts the same
tokens with and without it. (PEFT's `labels=` loss also scores the first real token from the last
virtual position, one term more per sequence; its logits at the real positions equal these.)

With a KV cache the virtual tokens go in once, on the forward that starts from an empty cache;
that cache is marked as holding them, and later forwards only extend the mask and shift the
position ids. A non-empty cache without the mark (filled inside `lt.disabled`) is refused rather
than misread. Attention masks and position ids passed in always describe the real tokens only.

One adapter per batch row (`adapter_names=`, methods/rows.py for the layers) is `RowPrompts`' job,
one set of hooks per model: each row gets its own adapter's virtual tokens (none for a row of
another method or the base), right-aligned in a block as wide as the longest, the block's unused
front masked out, and each row's positions counted from its own virtual tokens, so every row sees
exactly what it would alone. The per-adapter hooks stand aside while rows are set.

Init: "random" draws P from a normal at the scale (std) of the embedding matrix; "vocab" copies the
embeddings of random vocabulary rows; both draw from `seed`. "text" embeds `init_text` tokenised by
the model's own tokenizer (loaded by the model's name), repeated or cut to num_virtual_tokens.

The virtual tokens are inputs, not a weight update, so the adapter cannot be merged.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ..errors import LeantuneError
from .base import ModelMethod, register
from .layer import Router, adapter_dtype, model_router
from .token_init import init_token_ids, validate_init

# The submodule of the model that holds each prompt adapter's virtual tokens, by adapter name.
_PROMPTS_ATTR = "leantune_prompts"
# Attribute on a KV cache: {adapter name: virtual tokens} that the cache already holds.
_CACHE_MARK = "leantune_virtual_tokens"
# Attribute on a KV cache filled per row: each row's virtual-token count (RowPrompts).
_ROWS_CACHE_MARK = "leantune_row_virtual_tokens"
_ROW_HOOKS_ATTR = "leantune_row_prompts"


@register
@dataclass
class PromptTuning(ModelMethod):
    method_name: ClassVar[str] = "prompt"
    mergeable: ClassVar[bool] = False

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        self._require_int("num_virtual_tokens")
        validate_init(self.method_name, self.init, self.init_text)
        self._require_int("seed", minimum=0)

    def for_saved_tensors(self) -> "PromptTuning":
        return replace(self, init="random", init_text=None)  # no forward pass, no tokenizer

    def attach_to_model(self, model: nn.Module, adapter_name: str) -> list[str]:
        decoder = _decoder(model)
        if not adapter_name or "." in adapter_name:
            raise LeantuneError(f"prompt: adapter name {adapter_name!r} must be non-empty and without '.'")
        initial = initial_prompt(self, model, decoder.get_input_embeddings())
        modules = _prompt_modules(model)
        modules[adapter_name] = VirtualTokens(initial, adapter_name, model_router(model), decoder)
        if _ROW_HOOKS_ATTR not in model.__dict__:
            model.__dict__[_ROW_HOOKS_ATTR] = RowPrompts(modules, model_router(model), decoder)
        return []

    def detach_from_model(self, model: nn.Module, adapter_name: str) -> None:
        modules = _prompt_modules(model)
        modules[adapter_name].remove_hooks()
        del modules[adapter_name]
        if not len(modules):
            delattr(model, _PROMPTS_ATTR)
            model.__dict__.pop(_ROW_HOOKS_ATTR).remove_hooks()

    def trainable_parameters(self, model: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
        yield _prompt_modules(model)[adapter_name].prompt_embeddings

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": _prompt_modules(model)[adapter_name].prompt_embeddings}


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder body whose input the virtual tokens join (what `get_decoder()` returns)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    embeddings = getattr(decoder, "get_input_embeddings", lambda: None)() if isinstance(decoder, nn.Module) else None
    weight = getattr(embeddings, "weight", None)
    if decoder is None or decoder is model or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise LeantuneError(f"prompt tuning needs a Hugging Face causal LM with a decoder body and input embeddings "
                            f"(get_decoder(), get_input_embeddings()); {type(model).__name__} has none")
    return decoder


def _prompt_modules(model: nn.Module) -> nn.ModuleDict:
    modules = getattr(model, _PROMPTS_ATTR, None)
    if modules is None:
        modules = nn.ModuleDict()
        model.add_module(_PROMPTS_ATTR, modules)
    return modules


# -- the initial virtual tokens -------------------------------------------------------------

def initial_prompt(config: PromptTuning, model: nn.Module, embeddings: nn.Module) -> torch.Tensor:
    """(num_virtual_tokens, hidden) starting values, in the adapter dtype, on the embeddings' device."""
    weight = embeddings.weight.detach()
    count, hidden = config.num_virtual_tokens, weight.shape[1]
    dtype = adapter_dtype(weight)
    if config.init == "random":
        generator = torch.Generator().manual_seed(config.seed)
        values = torch.randn(count, hidden, generator=generator, dtype=dtype) * weight.to(dtype).std().cpu()
    else:
        ids = init_token_ids(config.method_name, config.init, config.init_text, count, config.seed, model,
                             weight.shape[0])
        values = weight[ids.to(weight.device)]
    return values.to(device=weight.device, dtype=dtype).clone()


# -- the mechanism: hooks on the decoder ----------------------------------------------------

class _DecoderHooks:
    """A pre-hook and a hook on the decoder (`before_decoder`, `after_decoder`), removable together."""

    def hook_decoder(self, decoder: nn.Module) -> None:
        self.positional_names = tuple(inspect.signature(decoder.forward).parameters)
        self.handles = (decoder.register_forward_pre_hook(self.before_decoder, with_kwargs=True),
                        decoder.register_forward_hook(self.after_decoder, with_kwargs=True))

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()

    def keywords(self, args: tuple, kwargs: dict) -> dict:
        """The decoder call's arguments, positional ones by name."""
        return {**dict(zip(self.positional_names, args)), **kwargs}


class VirtualTokens(nn.Module, _DecoderHooks):
    """One adapter's virtual tokens and the two decoder hooks that put them in and take them out."""

    def __init__(self, initial: torch.Tensor, adapter_name: str, router: Router, decoder: nn.Module):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(initial)
        self.adapter_name = adapter_name
        self.router = router
        # Per decoder call in flight, innermost last: how many leading positions its output must lose.
        # A call that raised leaves its entry below the later ones, where it is never read.
        self.pending: list[int] = []
        self.hook_decoder(decoder)

    @property
    def count(self) -> int:
        return self.prompt_embeddings.shape[0]

    def before_decoder(self, decoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.router.rows is not None or not self.router.runs(self.adapter_name):
            self.pending.append(0)  # rows set: RowPrompts puts each row's tokens in
            return None
        kwargs = self.keywords(args, kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            kwargs, added = self._continue(kwargs, cache), 0
        else:
            kwargs, added = self._prepend(decoder, kwargs), self.count
        self.pending.append(added)
        return (), kwargs

    def after_decoder(self, decoder: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        added = self.pending.pop()
        if not added:
            return None
        output = _cut_front(output, added)
        cache = _output_cache(output)
        if cache is not None:  # it now holds this adapter's virtual tokens: later forwards must not add them again
            setattr(cache, _CACHE_MARK, {**getattr(cache, _CACHE_MARK, {}), self.adapter_name: added})
        return output

    def _prepend(self, decoder: nn.Module, kwargs: dict) -> dict:
        """The first forward: P in front of the embedded inputs; mask and positions extended to match."""
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            if kwargs.get("input_ids") is None:
                raise LeantuneError(f"prompt adapter '{self.adapter_name}': the decoder got neither input_ids "
                                    "nor inputs_embeds")
            embeds = decoder.get_input_embeddings()(kwargs["input_ids"])
        prompt = self.prompt_embeddings.to(embeds.dtype)[None].expand(embeds.shape[0], -1, -1)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        positions = _positions_of_padded(kwargs, embeds.shape[1])
        self._extend_mask(kwargs)
        if positions is not None:
            virtual = torch.arange(self.count, dtype=positions.dtype, device=positions.device)
            kwargs["position_ids"] = torch.cat([virtual.expand(*positions.shape[:-1], -1), positions + self.count],
                                               dim=-1)
        return kwargs

    def _continue(self, kwargs: dict, cache: Any) -> dict:
        """A later forward: the cache holds the virtual tokens; the mask and positions must count them."""
        if self.adapter_name not in getattr(cache, _CACHE_MARK, {}):
            raise LeantuneError(f"prompt adapter '{self.adapter_name}': the KV cache given to this forward was "
                                "filled without its virtual tokens (e.g. inside lt.disabled); start from an empty cache")
        positions = _positions_of_padded(kwargs, _new_tokens(kwargs))
        self._extend_mask(kwargs)
        if positions is not None:
            kwargs["position_ids"] = positions + self.count
        return kwargs

    def _extend_mask(self, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None:
            return
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = f"a {mask.dim()}-D tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise LeantuneError(f"prompt adapter '{self.adapter_name}' extends 2-D attention masks (batch × tokens); "
                                f"this forward got {shape}")
        kwargs["attention_mask"] = torch.cat([mask.new_ones((mask.shape[0], self.count)), mask], dim=1)


class RowPrompts(_DecoderHooks):
    """The decoder hooks that give each batch row its own prompt adapter's virtual tokens."""

    def __init__(self, modules: nn.ModuleDict, router: Router, decoder: nn.Module):
        self.modules = modules
        self.router = router
        self.pending: list[tuple[int, ...] | None] = []  # per decoder call in flight: the rows' counts
        self.hook_decoder(decoder)

    def counts(self) -> tuple[int, ...] | None:
        rows = self.router.rows
        if rows is None or not any(name in self.modules for name in rows):
            return None
        return tuple(self.modules[name].count if name in self.modules else 0 for name in rows)

    def before_decoder(self, decoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        counts = self.counts()
        self.pending.append(None)
        if counts is None:
            return None
        kwargs = self.keywords(args, kwargs)
        given = kwargs.get("inputs_embeds")
        given = kwargs.get("input_ids") if given is None else given
        if given is None:
            raise LeantuneError("adapter_names with prompt adapters: the decoder got neither input_ids nor "
                                "inputs_embeds")
        if given.shape[0] != len(counts):
            return None  # routed_forward names the mismatch in one sentence
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        width = max(counts)
        virtual = torch.tensor(counts, device=given.device)
        past = 0
        if cache is not None and cache.get_seq_length() > 0:
            if getattr(cache, _ROWS_CACHE_MARK, None) != counts:
                raise LeantuneError("adapter_names: the KV cache given to this forward was not filled with these "
                                    "rows' prompt adapters; start from an empty cache")
            past = cache.get_seq_length() - width
        else:  # the first forward: the virtual tokens go in front of the embedded inputs
            embeds = kwargs.get("inputs_embeds")
            embeds = decoder.get_input_embeddings()(kwargs["input_ids"]) if embeds is None else embeds
            kwargs["inputs_embeds"] = torch.cat([self._block(counts, width, embeds), embeds], dim=1)
            kwargs["input_ids"] = None
            self.pending[-1] = counts
        real = given.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(len(counts), past + real, dtype=torch.long, device=given.device)
        block = torch.arange(width, device=given.device)[None] >= (width - virtual)[:, None]
        kwargs["attention_mask"] = torch.cat([block.to(mask.dtype), mask], dim=1)
        positions = _positions_of_padded({**kwargs, "attention_mask": mask}, real)
        if positions is None:
            positions = torch.arange(past, past + real, device=given.device)[None].expand(len(counts), -1)
        positions = positions + virtual[:, None].to(positions.dtype)
        if self.pending[-1] is not None:
            front = (torch.arange(width, device=given.device)[None] - (width - virtual)[:, None]).clamp(min=0)
            positions = torch.cat([front.to(positions.dtype), positions], dim=1)
        kwargs["position_ids"] = positions
        return (), kwargs

    def _block(self, counts: tuple[int, ...], width: int, embeds: torch.Tensor) -> torch.Tensor:
        """[rows, width, hidden]: each row's virtual tokens right-aligned, zeros (masked) in front."""
        names = self.router.rows
        rows = []
        for name, count in zip(names, counts):
            tokens = self.modules[name].prompt_embeddings.to(embeds.dtype) if count else embeds.new_zeros(0, embeds.shape[-1])
            rows.append(torch.cat([embeds.new_zeros(width - count, embeds.shape[-1]), tokens]))
        return torch.stack(rows)

    def after_decoder(self, decoder: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        counts = self.pending.pop()
        if counts is None:
            return None
        output = _cut_front(output, max(counts))
        cache = _output_cache(output)
        if cache is not None:
            setattr(cache, _ROWS_CACHE_MARK, counts)
        return output


def _positions_of_padded(kwargs: dict, new_tokens: int) -> torch.Tensor | None:
    """The position ids of the call's last `new_tokens` columns: the ones given, else, under a 2-D
    mask whose rows start with padding, each row counted from its first real token (0 on the pads
    before it), else None (the model counts 0, 1, ... itself, as it does through right padding).
    Counting through left padding would put the pads between the virtual tokens and the text, a
    gap the row alone (and `generate`, which passes positions) does not have."""
    positions, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if positions is not None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return positions
    leading_pads = (mask.long().cumsum(-1) == 0).sum(-1)
    if not bool(leading_pads.any()):
        return None
    columns = torch.arange(mask.shape[1], device=mask.device)
    return (columns[None] - leading_pads[:, None]).clamp(min=0)[:, -new_tokens:]


def _new_tokens(kwargs: dict) -> int:
    given = kwargs.get("inputs_embeds")
    given = kwargs.get("input_ids") if given is None else given
    return given.shape[1]


def _cut_front(output: Any, added: int) -> Any:
    """The decoder output without its first `added` positions (the virtual tokens)."""
    if isinstance(output, tuple):
        return (output[0][:, added:], *output[1:])
    output.last_hidden_state = output.last_hidden_state[:, added:]
    if getattr(output, "hidden_states", None) is not None:
        output.hidden_states = tuple(h[:, added:] for h in output.hidden_states)
    return output


def _output_cache(output: Any) -> Any:
    """The KV cache a decoder output carries (`cache`; `past_key_values` before transformers 5), read from
    the mapping itself: ModelOutput's own look-up warns about the old name."""
    if not isinstance(output, dict):
        return None
    cache = dict.get(output, "cache")
    return cache if cache is not None else dict.get(output, "past_key_values")
