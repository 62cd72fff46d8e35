"""Examples -> fitted to max_length, optionally packed, and served as a deterministic batch stream.

The stream is a pure function of (seed, epoch, position): a resumed run asks for the batches
from its saved position and gets exactly those the interrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import LeantuneError
from ..loss import IGNORE_INDEX
from .formats import Example

OVERLONG_CHOICES = ("truncate", "drop")
# Length grouping sorts within windows of this many batches: little padding, still shuffled.
GROUP_WINDOW_BATCHES = 16


@dataclass
class FitReport:
    kept: int
    truncated: int
    dropped: int

    def describe(self) -> str:
        return f"{self.kept} examples ({self.truncated} truncated, {self.dropped} dropped as too long or without loss tokens)"


def fit_to_length(examples: list[Example], max_length: int, overlong: str) -> tuple[list[Example], FitReport]:
    """Cut (`truncate`) or remove (`drop`) examples longer than `max_length`; drop any left without loss tokens."""
    if overlong not in OVERLONG_CHOICES:
        raise LeantuneError(f"overlong must be one of {', '.join(OVERLONG_CHOICES)}, got {overlong!r}")
    kept, truncated, dropped = [], 0, 0
    for example in examples:
        cut = len(example) > max_length
        if cut and overlong == "drop":
            dropped += 1
            continue
        if cut:
            example = Example(example.input_ids[:max_length], example.labels[:max_length])
        if example.loss_tokens() == 0:
            dropped += 1  # a cut example left without loss tokens counts as dropped only
            continue
        truncated += cut
        kept.append(example)
    return kept, FitReport(len(kept), truncated, dropped)


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate consecutive examples into rows of at most `max_length` tokens.

    Each packed example keeps its own positions (counted from 0) and sees only itself: the loss
    passes the restarting positions to transformers without a mask, which it reads as packed
    documents (a block-diagonal causal mask); `check_packed_rows_stay_apart` (loss.py) confirms
    that a model does so before a packed run starts. The first token of each example carries no
    loss, as in an unpacked row.
    """
    rows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        if ids and len(ids) + len(example) > max_length:
            rows.append(Example(ids, labels, positions))
            ids, labels, positions = [], [], []
        ids = ids + example.input_ids
        labels = labels + [IGNORE_INDEX] + example.labels[1:]
        positions = positions + list(range(len(example)))
    if ids:
        rows.append(Example(ids, labels, positions))
    return rows


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `labels` (-100 on padding) and `attention_mask`; with packed rows
    also `position_ids`, 0 on padding (each padding token reads as a document of its own)."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = any(e.position_ids is not None for e in examples)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long) if packed else None
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
        if position_ids is not None:
            own = example.position_ids if example.position_ids is not None else list(range(n))
            position_ids[row, :n] = torch.tensor(own, dtype=torch.long)  # padding stays at 0: no position to outgrow
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch


class BatchStream:
    """An endless, deterministic sequence of batches over epochs, addressed by micro-batch position."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int,
                 shuffle: bool = True, group_by_length: bool = True):
        if not examples:
            raise LeantuneError("the dataset is empty")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """The example indices of every batch of `epoch`."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        n = len(self.examples)
        if not self.shuffle:
            order = list(range(n))
            batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=generator).tolist()
            if self.group_by_length:
                window = self.batch_size * GROUP_WINDOW_BATCHES
                order = [i for start in range(0, n, window)
                         for i in sorted(order[start:start + window], key=lambda j: len(self.examples[j]))]
            batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
            if self.group_by_length:
                batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        self._epoch_cache = (epoch, batches)
        return batches

    def batch_at(self, position: int) -> dict[str, torch.Tensor]:
        """The micro-batch at global `position` (epoch = position // batches_per_epoch)."""
        epoch, index = divmod(position, self.batches_per_epoch)
        indices = self.epoch_order(epoch)[index]
        return collate([self.examples[i] for i in indices], self.pad_id)

    def step_batches(self, position: int, accumulate: int, epochs: float | None = None) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of one optimizer step from `position`: up to `accumulate` of them, never
        reaching into the next epoch (an epoch's last step may be shorter, as in transformers.Trainer)
        nor, in a run of `epochs` epochs, past its last micro-batch (a fractional last epoch too)."""
        left = self.batches_per_epoch - position % self.batches_per_epoch
        if epochs is not None:
            left = min(left, max(1, round(epochs * self.batches_per_epoch) - position))
        return [self.batch_at(position + i) for i in range(min(accumulate, left))]

    def steps_for(self, epochs: float, accumulate: int) -> int:
        """Optimizer steps in `epochs` epochs of steps as `step_batches` makes them."""
        whole, rest = divmod(round(epochs * self.batches_per_epoch), self.batches_per_epoch)
        return max(1, whole * -(-self.batches_per_epoch // accumulate) + -(-rest // accumulate))

    def iterate(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        position = start
        while True:
            yield self.batch_at(position)
            position += 1
