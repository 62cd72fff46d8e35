"""How close a training step comes to what the machine's matrix multiplication allows.

The bound is the step's matmul work divided by the rate this machine reaches on one large GEMM of
the model's own shapes, measured in the same process. The work is what PyTorch's own FLOP counter
(`torch.utils.flop_counter.FlopCounterMode`) counts for one forward and backward of the step —
every matrix product the implementation really runs, adapters included — plus attention where the
counter does not see it (its CPU flash kernel): scores and weighted sum, 4·heads·head_dim FLOPs per
query per key over the keys a causal query sees, backward twice the forward.

Everything else (normalisation, activations, rotary embeddings, softmax, the optimizer, glue)
counts as no work: the share says how much of the step's time the matmuls that must be done would
take at the rate this machine does them.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import kernels
from ..loss import plain_output_head


def counted_flops(run: Callable[[], None], model: nn.Module, lengths: Iterable[int]) -> float:
    """FLOPs of `run` (one forward and backward over sequences of these lengths) as the counter
    sees them, with attention added when the counter saw no attention kernel. Products run through
    torch's own ops here: the counter does not see oneDNN's (`kernels`), which compute the same."""
    plain_output_head(model)  # the loss's one-off check of the head runs now, outside the count
    in_place = {torch.ops.aten.addmm_: _in_place_addmm_flops}  # LoRA's and DoRA's fused products
    with kernels.torch_products(), FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        run()
    total = float(counter.get_total_flops())
    ops = {str(op) for op in counter.get_flop_counts().get("Global", {})}
    if not any("attention" in op for op in ops):
        total += attention_flops(model, lengths)
    return total


def _in_place_addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """x.addmm_(a, b) is the product a b like addmm, which the counter's own table has only out of place."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def attention_flops(model: nn.Module, lengths: Iterable[int]) -> float:
    """Causal attention's matmul FLOPs for one forward and backward (see the module docstring)."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    keys_seen = sum(n * (n + 1) / 2 for n in lengths)
    return 3.0 * 4 * heads * head_dim * keys_seen * config.num_hidden_layers


def _largest_linear(model: nn.Module) -> tuple[int, int]:
    """(in, out) of the decoder's largest linear at its dense shape (4-bit linears are nn.Linear too)."""
    head = model.get_output_embeddings()
    shapes = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            state = getattr(module.weight, "quant_state", None)
            out_features, in_features = state.shape if state is not None else module.weight.shape
            shapes.append((int(in_features), int(out_features)))
    return max(shapes, key=lambda shape: shape[0] * shape[1])


def gemm_rate(model: nn.Module, tokens: int, repeats: int = 10) -> float:
    """FLOP/s of this process on the model's largest linear shape with `tokens` rows, in the model's
    compute dtype and on its device: the faster of torch's `mm` and, where it runs, oneDNN's product
    (`kernels`), each the median of `repeats` timed products after two untimed. The bound is what
    the machine reaches, whichever library reaches it."""
    like = model.get_input_embeddings().weight
    in_features, out_features = _largest_linear(model)
    x = torch.randn(tokens, in_features, dtype=like.dtype, device=like.device)
    w = torch.randn(in_features, out_features, dtype=like.dtype, device=like.device)
    out = torch.empty(tokens, out_features, dtype=like.dtype, device=like.device)
    runs = [lambda: torch.mm(x, w, out=out)]  # into one buffer: a fresh one would time page faults too
    if kernels._takes(x, w.t(), None):
        runs.append(lambda: kernels.matmul(x, w))  # allocates its output: if anything, a lower rate
    return max(2.0 * tokens * in_features * out_features / _median_seconds(run, repeats, like.device) for run in runs)


def attention_gemm_rate(model: nn.Module, seq: int, repeats: int = 10) -> float:
    """FLOP/s of the products attention is made of, at `seq` keys for every head at once: scores
    (queries x head_dim by head_dim x seq) and weighted sum (queries x seq by seq x head_dim), for
    blocks of 64 queries up to all `seq` (a fused kernel tiles its queries), into buffers allocated
    once; the fastest of them. No attention kernel runs its products faster than the GEMMs they are,
    so this caps what any kernel could make of attention's FLOPs."""
    like = model.get_input_embeddings().weight
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    options = dict(dtype=like.dtype, device=like.device)
    keys, values = torch.randn(heads, head_dim, seq, **options), torch.randn(heads, seq, head_dim, **options)
    rates = []
    for block in sorted({min(size, seq) for size in (64, 128, 256, seq)}):
        queries = torch.randn(heads, block, head_dim, **options)
        scores, summed = torch.empty(heads, block, seq, **options), torch.empty(heads, block, head_dim, **options)
        flops = 2.0 * heads * block * seq * head_dim
        for run in (lambda: torch.bmm(queries, keys, out=scores), lambda: torch.bmm(scores, values, out=summed)):
            rates.append(flops / _median_seconds(run, repeats, like.device))
    return max(rates)


def _median_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for attempt in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)
