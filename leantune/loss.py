"""Causal-LM loss that never materialises the full (tokens x vocabulary) logits.

The decoder body runs as usual; the output projection and cross-entropy then run over chunks of
`chunk_tokens` tokens inside one autograd function. While a chunk's logits exist, its forward also
turns them into the softmax gradient in place and folds it straight into the gradients of the
hidden states (and of the head weight when it trains); backward only scales what was formed.
Peak extra memory is one chunk of logits instead of all of them plus their gradient.

Only positions whose (shifted) label is not -100 reach the head at all, so masked prompt tokens
cost nothing there. The result equals Hugging Face's loss: labels shifted by one, -100 ignored,
mean over the remaining tokens (or sum / `num_items` for gradient accumulation).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import LeantuneError

IGNORE_INDEX = -100  # the label of a token without loss (Hugging Face's convention); data/ writes it
DEFAULT_CHUNK_TOKENS = 256
# Below this vocabulary size the full logits are small enough that chunking buys nothing.
CHUNKED_MIN_VOCAB = 8192


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                   chunked: bool | None = None, num_items: int | float | torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens of a Hugging Face causal LM.

    `labels` has the shape of `input_ids` (not yet shifted); -100 marks tokens without loss.
    `chunked=None` picks the chunked path for vocabularies of at least CHUNKED_MIN_VOCAB entries
    when the model's head is a plain linear layer; `chunked=False` is the plain full-logits loss.
    `num_items` replaces the count of labelled tokens as the denominator (gradient accumulation
    over micro-batches divides by the tokens of the whole accumulated batch).
    """
    if labels.shape != input_ids.shape:
        raise LeantuneError(f"labels have shape {tuple(labels.shape)}, input_ids {tuple(input_ids.shape)}")
    if not _bidirectional(model):
        attention_mask = decoder_attention_mask(attention_mask, labels)
    decoder, head = _decoder_and_head(model) if chunked is not False else (None, None)
    if chunked is None:
        chunked = head is not None and head.out_features >= CHUNKED_MIN_VOCAB
    elif chunked and head is None:
        raise LeantuneError("the chunked loss needs a model whose output head is a plain linear layer "
                            "without logit scaling or soft-capping; use the full-logits loss")
    if not chunked:
        return full_logits_loss(model, input_ids, labels, attention_mask, num_items, position_ids)
    if chunk_tokens < 1:
        raise LeantuneError(f"chunk_tokens must be >= 1, got {chunk_tokens}")

    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden = hidden[:, :-1][keep]  # only labelled positions reach the head
    targets = targets[keep]
    denominator = _denominator(num_items, targets.numel(), hidden)
    return _ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_tokens,
                                            _compute_dtype(hidden), torch.is_grad_enabled()) / denominator


def decoder_attention_mask(attention_mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor | None:
    """The mask the decoder needs for this loss: None where it would only cover right padding.

    Under causal attention no token sees a later one, so padding after a row's last token never
    reaches a labelled position, and positions count from 0 either way. Without a mask transformers
    calls SDPA with is_causal, whose kernel skips the blocks above the diagonal instead of applying
    a full mask to them (the demo job with and without this: benchmarks/results/2026-12-07-cpu-whole-job
    against -whole-job-2).
    Any other mask (left or inner padding, labels on masked tokens, 4-D masks) is passed on as given.
    With position_ids that restart within a row and no mask, transformers reads the row as packed
    documents, each attending only to itself: what packed rows (data/batching.py) rely on, their
    padding at position 0 (each padding token a document of its own)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape != labels.shape:
        return attention_mask
    real = attention_mask != 0
    if bool((real[:, 1:] & ~real[:, :-1]).any()) or bool((labels[~real] != IGNORE_INDEX).any()):
        return attention_mask
    return None


def _bidirectional(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "use_bidirectional_attention", False) or getattr(config, "is_encoder_decoder", False))


def full_logits_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     attention_mask: torch.Tensor | None = None,
                     num_items: int | float | torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: the model's full logits, shifted, cross-entropy summed and divided once."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / _denominator(num_items, int((targets != IGNORE_INDEX).sum()), total)


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss of `labels` (after the one-token shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _denominator(num_items, count: int, like: torch.Tensor) -> torch.Tensor | float:
    value = count if num_items is None else num_items
    # An all-masked batch contributes a zero loss (and zero gradients), not 0/0 = NaN. Any other
    # denominator is used as given, fractional ones (a count averaged over processes) included.
    if isinstance(value, torch.Tensor):
        value = value.to(like.device)
        return torch.where(value == 0, torch.ones_like(value), value)
    return float(value) if value != 0 else 1.0


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Linear | None]:
    """The decoder body and output head if logits are exactly `head(decoder(...))`; (None, None) otherwise."""
    get_head = getattr(model, "get_output_embeddings", None)
    get_decoder = getattr(model, "get_decoder", None)
    if not callable(get_head) or not callable(get_decoder):
        return None, None
    head, decoder = get_head(), get_decoder()
    if not kernels.is_plain_linear(head) or not isinstance(decoder, nn.Module) or decoder is model:
        return None, None
    config = getattr(model, "config", None)
    # Architectures that post-process the logits (soft-capping, scaling) go through the model itself.
    for attribute in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            return None, None
    if not _head_gives_the_logits(model, decoder, head):  # a transform under a name not listed above
        return None, None
    return decoder, head


def plain_output_head(model: nn.Module) -> bool:
    """Whether the chunked loss can stand in for the model's logits (see _decoder_and_head)."""
    return _decoder_and_head(model)[1] is not None


_PLAIN_HEAD: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _head_gives_the_logits(model: nn.Module, decoder: nn.Module, head: nn.Linear) -> bool:
    """Whether the model's logits are its head applied to its decoder's output, checked once per
    model on a few tokens: any scaling or capping of the logits (under whatever config name)
    shows as a difference, since both sides run the same float operations otherwise."""
    if model not in _PLAIN_HEAD:
        ids = _probe_ids(head.out_features, 8, head.weight.device)
        with _quiet_forward(model):
            logits = model(input_ids=ids, use_cache=False).logits.float()
            rebuilt = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
        scale = float(logits.abs().max()) or 1.0
        _PLAIN_HEAD[model] = bool(torch.allclose(logits, rebuilt, rtol=0.0, atol=1e-6 * scale))
    return _PLAIN_HEAD[model]


def check_packed_rows_stay_apart(model: nn.Module, setting: str = "config key 'packing'",
                                 remedy: str = "set packing: false") -> None:
    """Refuse packing for a model (and its adapter) under which a packed example does not compute
    as it does alone: transformers before packed-document masks, a model that builds its own mask,
    prompt or prefix tuning (their virtual tokens stand before a row's first example only)."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 16)
    device = next(model.parameters()).device
    first, second = _probe_ids(vocab, 6, device, offset=1), _probe_ids(vocab, 5, device, offset=7)
    # two rows, as training batches have (transformers' flash-attention path reads packing in one-row batches only)
    rows = torch.cat([torch.cat([first, second], 1), torch.cat([second, first], 1)])
    positions = torch.stack([torch.cat([torch.arange(6), torch.arange(5)]),
                             torch.cat([torch.arange(5), torch.arange(6)])]).to(device)
    with _quiet_forward(model):
        packed = model(input_ids=rows, position_ids=positions, use_cache=False).logits
        alone = [model(input_ids=ids, use_cache=False).logits for ids in (second, first)]
    packed = torch.cat([packed[0, 6:], packed[1, 5:]]).float()
    alone = torch.cat([logits[0] for logits in alone]).float()
    scale = float(alone.abs().max()) or 1.0
    if not torch.allclose(packed, alone, rtol=0.0, atol=1e-4 * scale):
        name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise LeantuneError(
            f"{setting}: with this model ({name}) and method a packed example does not compute as it "
            f"does alone (its logits differ by {float((packed - alone).abs().max()):.3g}); {remedy}")


def _probe_ids(vocab: int, count: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    return ((torch.arange(count) * 7 + offset) % vocab).to(device)[None]


@contextmanager
def _quiet_forward(model: nn.Module) -> Iterator[None]:
    """No gradients, no autocast, dropout off; the model's train/eval modes restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(next(model.parameters()).device.type, enabled=False):
            yield
    finally:
        for module, training in modes:
            module.training = training


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head's matmul dtype: autocast's when active, else the hidden states' own."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i Wᵀ + b, target_i), chunk by chunk; returns the (unnormalised) sum.

    The gradients are formed in the forward pass, while each chunk's logits are at hand, for an
    upstream gradient of 1; backward only scales them. That spends no second head matmul on
    recomputing logits, and what is kept between the passes (the hidden states' gradient) has
    the size of the hidden states a recomputing backward would have kept instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, compute_dtype, grad_enabled):
        # needs_input_grad stays set under no_grad: the caller's grad mode says whether to form any.
        need_hidden, need_weight, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        # Softmax statistics stay in at least float32 whatever the matmul dtype.
        stats_dtype = torch.promote_types(compute_dtype, torch.float32)
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        total = torch.zeros((), dtype=stats_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], chunk_tokens):
                stop = start + chunk_tokens
                h = hidden[start:stop].to(compute_dtype)
                logits = kernels.linear(h, w, b).to(stats_dtype)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                chunk_targets = targets[start:stop, None]
                total += (chunk_lse - logits.gather(1, chunk_targets).squeeze(1)).sum()
                if need_hidden or need_weight or need_bias:
                    _accumulate_chunk_gradients(logits, chunk_lse, chunk_targets, h, w, compute_dtype,
                                                grad_hidden, grad_weight, grad_bias, start, stop)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(None if grad is None else (grad * grad_total.to(grad.dtype)).to(dtype))
        return (*grads, None, None, None, None)


def _accumulate_chunk_gradients(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor,
                                h: torch.Tensor, w: torch.Tensor, compute_dtype: torch.dtype,
                                grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None,
                                grad_bias: torch.Tensor | None, start: int, stop: int) -> None:
    """d(lse - logit_target)/d logits = softmax - onehot, built in place over the chunk's logits,
    folded into the gradients of the hidden states, the head weight and its bias."""
    grad_logits = logits.sub_(lse[:, None]).exp_()
    grad_logits.scatter_add_(1, targets, torch.full_like(grad_logits[:, :1], -1.0))
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)
    grad_logits = grad_logits.to(compute_dtype)
    if grad_hidden is not None:
        grad_hidden[start:stop] = kernels.matmul(grad_logits, w).to(grad_hidden.dtype)
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype), h.to(grad_weight.dtype))
