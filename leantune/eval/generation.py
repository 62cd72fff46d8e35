"""Batched text generation for Hugging Face causal LMs, with or without adapters.

Prompts are sorted by length and run in left-padded batches through `model.generate` (KV cache),
greedy or sampled (temperature / top-p). Each row stops at an end-of-text token or as soon as its
generated text contains one of the stop strings; a batch ends when all its rows have stopped.
Returned texts are cut before the first stop string.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteriaList

from ..api import virtual_tokens
from ..errors import LeantuneError
from ..models import check_fits_positions
from .progress import progress_bar

END_TOKENS = ("<|endoftext|>", "<|im_end|>")


def end_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's EOS plus the usual end-of-text specials it knows."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in END_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop_string in stop:
        index = text.find(stop_string)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


class _StopCriterion:
    """Per-row stopping on end tokens and stop strings; records how many tokens each row produced.

    Only the last few generated tokens are decoded at each step: enough to contain any stop string.
    After each step it reports the rows that stopped in it to `on_step` (the progress bar).
    """

    def __init__(self, tokenizer: Any, prompt_length: int, stop: Sequence[str], end_ids: list[int],
                 on_step: Callable[[int], Any] = lambda stopped: None):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stop = list(stop)
        self.end_ids = end_ids
        self.window = max((len(s) for s in self.stop), default=0) + 4
        self.lengths: list[int | None] | None = None
        self.on_step = on_step

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length:]
        if self.lengths is None:
            self.lengths = [None] * input_ids.shape[0]
        done, stopped = [], 0
        for row, tokens in enumerate(generated.tolist()):
            if self.lengths[row] is None and self._row_is_done(tokens):
                self.lengths[row] = len(tokens)
                stopped += 1
            done.append(self.lengths[row] is not None)
        self.on_step(stopped)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _row_is_done(self, tokens: list[int]) -> bool:
        if tokens and tokens[-1] in self.end_ids:
            return True
        if not self.stop:
            return False
        tail = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True)
        return any(stop_string in tail for stop_string in self.stop)


def _generation_config(tokenizer: Any, max_new_tokens: int, temperature: float, top_p: float,
                       end_ids: list[int]) -> Any:
    sampling = temperature > 0
    options = dict(max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=1, use_cache=True,
                   eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    if sampling:  # plain temperature / nucleus sampling: top_k=0 turns Hugging Face's default top-k off
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    return GenerationConfig(**options)


def _check_options(prompts: Sequence[str], max_new_tokens: int, temperature: float, top_p: float,
                   batch_size: int) -> None:
    if isinstance(prompts, str):
        raise LeantuneError("generate expects a list of prompts, got a single string")
    if max_new_tokens < 1:
        raise LeantuneError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:  # nan passes `< 0`: every comparison with it is false
        raise LeantuneError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:  # also refuses nan
        raise LeantuneError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise LeantuneError(f"batch_size must be at least 1, got {batch_size}")


def _check_prompts(prompts: list[str]) -> None:
    for number, prompt in enumerate(prompts, start=1):
        if not isinstance(prompt, str):
            raise LeantuneError(f"prompt {number} of {len(prompts)} is a {type(prompt).__name__}, not a string")
        if not prompt:  # no token to continue from: a crash alone, an all-padding row in a batch
            raise LeantuneError(f"prompt {number} of {len(prompts)} is empty; every prompt needs some text to continue")


def _encode_batch(tokenizer: Any, texts: list[str], max_prompt_tokens: int | None,
                  special_tokens: bool = True) -> dict[str, torch.Tensor]:
    """Left-padded ids and mask; prompts longer than `max_prompt_tokens` keep their end."""
    encoded = [tokenizer(text, add_special_tokens=special_tokens)["input_ids"] for text in texts]
    if max_prompt_tokens is not None:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (), batch_size: int = 8,
             seed: int = 0, max_prompt_tokens: int | None = None,
             stats: dict[str, Any] | None = None, progress: bool = False, desc: str = "generate",
             special_tokens: bool = True) -> list[str]:
    """Generate a continuation for each prompt; greedy when temperature == 0. `special_tokens`
    False: the prompts are rendered chat templates, which write BOS themselves where they want it.

    Returns the generated texts (prompt excluded, special tokens skipped), each cut before its
    first stop string, in the order of `prompts`. If `stats` is a dict it receives prompt_tokens,
    new_tokens (tokens until each row stopped), seconds, and hit_budget: per prompt, whether it ran
    out of `max_new_tokens` before an end token or stop string (its last line is then unfinished).
    `progress` shows a bar (labelled `desc`) over the prompts on a terminal's stderr.
    """
    _check_options(prompts, max_new_tokens, temperature, top_p, batch_size)
    prompts = list(prompts)
    _check_prompts(prompts)
    end_ids = end_token_ids(tokenizer)
    config = _generation_config(tokenizer, max_new_tokens, temperature, top_p, end_ids)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    texts: list[str] = [""] * len(prompts)
    budget_hits = [False] * len(prompts)
    counts = {"prompt_tokens": 0, "new_tokens": 0}
    batches = [(rows, _encode_batch(tokenizer, [prompts[i] for i in rows], max_prompt_tokens, special_tokens))
               for rows in (order[first:first + batch_size] for first in range(0, len(order), batch_size))]
    widest = max(batch["input_ids"].shape[1] for _, batch in batches)  # checked before any batch runs
    check_fits_positions(model, widest + max_new_tokens, "the longest prompt with max_new_tokens",
                         "shorten the prompt or lower max_new_tokens", virtual_tokens(model))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    bar = progress_bar(len(prompts), desc, "prompt", progress)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for rows, batch in batches:
                results = _generate_batch(model, tokenizer, batch, config, stop, end_ids, device, counts, bar.update)
                for row, (text, hit_budget) in zip(rows, results):
                    texts[row] = text
                    budget_hits[row] = hit_budget
    finally:
        bar.close()
        model.train(was_training)
    if stats is not None:
        stats.update(counts, prompts=len(prompts), seconds=time.perf_counter() - start, hit_budget=budget_hits)
    return texts


def _generate_batch(model: nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor], config: Any,
                    stop: Sequence[str], end_ids: list[int], device: torch.device,
                    counts: dict[str, int], advance: Callable[[int], Any]) -> list[tuple[str, bool]]:
    """(text, ran out of tokens) per row of one left-padded batch; `advance(n)`: n more rows are done."""
    prompt_length = batch["input_ids"].shape[1]
    criterion = _StopCriterion(tokenizer, prompt_length, stop, end_ids, on_step=advance)
    output = model.generate(input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device),
                            generation_config=config, stopping_criteria=StoppingCriteriaList([criterion]))
    generated = output[:, prompt_length:].tolist()
    lengths = criterion.lengths or [None] * len(generated)
    advance(lengths.count(None))  # the rows that ran out of tokens
    counts["prompt_tokens"] += int(batch["attention_mask"].sum())
    results = []
    for tokens, length in zip(generated, lengths):
        tokens = tokens[:length] if length is not None else tokens
        counts["new_tokens"] += len(tokens)
        results.append((cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop), length is None))
    return results
