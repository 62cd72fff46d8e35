"""Loss and perplexity of a causal LM over a tokenized dataset (what `leantune eval` reports).

The loss is the mean next-token cross-entropy over every labelled token of the dataset (labels
of -100, e.g. prompts, carry none), so long examples weigh by their token count; perplexity is
exp(loss).
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
from torch import nn

from ..api import virtual_tokens
from ..data import collate
from ..errors import LeantuneError
from ..loss import causal_lm_loss, count_loss_tokens
from ..models import check_fits_positions
from .progress import progress_bar


@torch.no_grad()
def loss_and_perplexity(model: nn.Module, examples: Sequence[Any], pad_id: int, batch_size: int = 8,
                        progress: bool = False, share: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """{"loss", "perplexity", "loss_sum", "tokens", "examples", "seconds"} over `examples` (input_ids + labels).

    `share` = (rank, processes): this process takes every processes-th batch from the rank-th on and
    reports its own "loss_sum" and "tokens" (the caller sums them over processes); every process
    runs the same number of forwards (a spare one repeats a batch and counts nothing), since a
    sharded model gathers its weights in each."""
    if not examples:
        raise LeantuneError("cannot evaluate on an empty dataset")
    if batch_size < 1:
        raise LeantuneError(f"batch_size must be at least 1, got {batch_size}")
    check_fits_positions(model, max(e.positions() for e in examples), "the longest example", "lower max_length",
                         virtual_tokens(model))
    rank, processes = share
    device = next(model.parameters()).device
    # Similar lengths share a batch: less padding, same result (the loss is a token-weighted sum).
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    firsts = list(range(0, len(order), batch_size))
    mine = firsts[rank::processes]
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    start = time.perf_counter()
    bar = progress_bar(len(order), "eval", "example", progress)
    try:
        for call in range(-(-len(firsts) // processes)):
            first = mine[call] if call < len(mine) else firsts[0]
            batch = collate([examples[i] for i in order[first:first + batch_size]], pad_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            loss = float(causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                        num_items=1, position_ids=batch.get("position_ids")))
            if call < len(mine):
                total += loss
                tokens += count_loss_tokens(batch["labels"])
                bar.update(min(batch_size, len(order) - first) * processes)
    finally:
        bar.close()
        model.train(was_training)
    if tokens == 0 and processes == 1:
        raise LeantuneError("the dataset has no labelled tokens to evaluate")
    loss = total / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "loss_sum": total, "tokens": tokens,
            "examples": len(examples), "seconds": time.perf_counter() - start}
