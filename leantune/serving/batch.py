"""The running batch of the server: one row per sequence, each with its own adapter, sharing one
left-padded `transformers` cache that grows by a column per decode step (written into room kept at
the end of each layer's buffer: `GrowingLayer`).

Sequences join between decode steps: each newcomer is prefilled alone (no padding to spend
compute on), then the newcomers' caches and the running one are left-padded to the same length
and concatenated along the batch. Finished sequences leave by `batch_select_indices`,
and columns that no remaining row uses (all padding) are cut off the front, so the cache is as
long as the longest live sequence, not as the time since the batch started.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def cache_keyword(model: nn.Module) -> str:
    """The forward's name for the cache argument in the installed transformers ("cache" from 5.x on)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_logits_only(model: nn.Module) -> dict[str, int]:
    """The forward's keyword for computing logits at the last position only (the prefill needs no
    more; the head over every prompt position is most of a long prefill's time), where it has one."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def returned_cache(output: Any) -> DynamicCache:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with room for `HEADROOM` more columns.

    DynamicLayer concatenates, copying the layer's whole cache for each new token: for 8 rows over a
    few hundred tokens that was about a tenth of a decode step on CPU. Here a step writes one column,
    and the cache is copied once per HEADROOM tokens. Whoever replaces `keys`/`values` from outside
    (crop, batch_select_indices, the batch's trim) leaves plain tensors, adopted at the next update."""

    HEADROOM = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, added = self.get_seq_length(), key_states.shape[-2]
        replaced = self.keys is not getattr(self, "_key_view", None) or self.values is not self._value_view
        if replaced or length + added > self._key_buffer.shape[-2]:
            self._key_buffer = self._with_room(self.keys, key_states, length + added)
            self._value_buffer = self._with_room(self.values, value_states, length + added)
        end = length + added
        self._key_buffer[..., length:end, :] = key_states
        self._value_buffer[..., length:end, :] = value_states
        self.keys = self._key_view = self._key_buffer[..., :end, :]
        self.values = self._value_view = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def _with_room(self, held: torch.Tensor, new: torch.Tensor, needed: int) -> torch.Tensor:
        buffer = new.new_empty((*new.shape[:-2], needed + self.HEADROOM, new.shape[-1]))
        if held.numel():
            buffer[..., :held.shape[-2], :] = held
        return buffer


def growing_cache() -> DynamicCache:
    """An empty DynamicCache whose layers, added as the model fills them, are GrowingLayers."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


class RunningBatch:
    """Token ids in, next-token logits out, for a changing set of rows."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.keyword = cache_keyword(model)
        self.prefill_options = last_logits_only(model)
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length], 1 where a real token sits
        self.adapters: list[str | None] = []

    def __len__(self) -> int:
        return len(self.adapters)

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None]) -> torch.Tensor:
        """Run the newcomers' prompts, add them to the batch; their next-token logits [n, vocab].

        Each prompt runs alone: left-padding them to the longest would spend the prefill's compute,
        most of its time, on padding (prompts of 100-300 tokens: a third of it)."""
        device = next(self.model.parameters()).device
        parts, logits = [], []
        for ids, adapter in zip(prompts, adapters):
            input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
            mask = torch.ones_like(input_ids)
            output = self.model(input_ids=input_ids, attention_mask=mask, use_cache=True, adapter_names=[adapter],
                                **{self.keyword: DynamicCache()}, **self.prefill_options)
            parts.append((returned_cache(output), mask, [adapter]))
            logits.append(output.logits[:, -1, :])
        self._join(parts)
        return torch.cat(logits).float()

    @torch.no_grad()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """One step: each row's last token in, its next-token logits [rows, vocab] out."""
        device = self.mask.device
        positions = self.mask.sum(-1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones((len(self), 1), dtype=self.mask.dtype, device=device)], dim=1)
        input_ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=device)
        output = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                            adapter_names=list(self.adapters), **{self.keyword: self.cache})
        self.cache = returned_cache(output)
        return output.logits[:, -1, :].float()

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in this order); drop the front columns no kept row uses."""
        if not rows:
            self.cache, self.mask, self.adapters = None, None, []
            return
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        self.adapters = [self.adapters[i] for i in rows]
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else self.mask.shape[1]
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]

    def _join(self, parts: list[tuple[DynamicCache, torch.Tensor, list[str | None]]]) -> None:
        """Add the newcomers' caches to the running one: all left-padded to one length, then stacked."""
        if self.cache is not None:
            parts = [(self.cache, self.mask, self.adapters), *parts]
        width = max(mask.shape[1] for _, mask, _ in parts)
        merged = growing_cache()
        for index, layers in enumerate(zip(*(cache.layers for cache, _, _ in parts))):
            keys = torch.cat([_left_pad(layer.keys, width, -2) for layer in layers])
            values = torch.cat([_left_pad(layer.values, width, -2) for layer in layers])
            merged.update(keys, values, index)
        self.cache = merged
        self.mask = torch.cat([_left_pad(mask, width, 1) for _, mask, _ in parts])
        self.adapters = [name for _, _, names in parts for name in names]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from one row's logits: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
