"""Where the time of one training step goes: torch.profiler self time, grouped by kind of work.

Every operator's self time lands in exactly one group: anything under the optimizer step is
"optimizer"; the rest is classified by operator name (matmuls, attention, elementwise,
reductions/norms/loss, memory movement, everything else). Phase totals (forward + loss,
backward, optimizer) come from the step's own `record_function` labels.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

GROUPS = ("matmul", "attention", "elementwise", "reduction/norm/loss", "memory/layout", "optimizer", "other")
PHASES = ("bench/forward+loss", "bench/backward", "bench/optimizer")

_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "dot", "mv", "addmv",
           "_addmm_activation", "addmm_", "mm_", "_linear_pointwise"}  # the last: oneDNN's (leantune/kernels.py)
_ELEMENTWISE = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "silu", "silu_", "silu_backward",
                "sigmoid", "sigmoid_backward", "exp", "exp_", "neg", "pow", "pow_", "rsqrt", "sqrt", "sqrt_",
                "tanh", "where", "clamp", "clamp_", "fill_", "zero_", "zeros_like", "masked_fill", "masked_fill_",
                "lerp_", "addcmul_", "addcdiv_", "rsub", "cos", "sin", "reciprocal", "abs", "sign",
                "threshold_backward", "gelu", "gelu_backward", "_foreach_add_", "_foreach_mul_", "maximum"}
_REDUCTION = {"sum", "mean", "logsumexp", "softmax", "_softmax", "_softmax_backward_data", "log_softmax",
              "_log_softmax", "_log_softmax_backward_data", "nll_loss", "nll_loss_forward", "nll_loss_backward",
              "nll_loss_nd", "cross_entropy_loss", "norm", "linalg_vector_norm", "max", "amax", "var", "var_mean",
              "rms_norm", "_fused_rms_norm", "_fused_rms_norm_backward"}
_MEMORY = {"copy_", "clone", "contiguous", "to", "_to_copy", "cat", "index", "index_select", "gather",
           "scatter", "scatter_", "scatter_add_", "embedding", "embedding_backward", "embedding_dense_backward",
           "_index_put_impl_", "index_put_", "index_add_", "stack", "empty", "empty_like", "empty_strided",
           "new_empty", "new_zeros", "zeros", "ones", "full", "resize_", "as_strided", "slice", "narrow",
           "select", "t", "transpose", "permute", "reshape", "view", "expand", "unsqueeze", "squeeze", "_unsafe_view",
           "detach", "alias", "split", "chunk", "unbind", "repeat_interleave", "roll"}


def classify(name: str) -> str:
    """The group of an operator by its name ('aten::addmm' -> 'matmul')."""
    short = name.split("::")[-1]
    if "scaled_dot_product" in short or "flash_attention" in short or "efficient_attention" in short:
        return "attention"
    for group, names in (("matmul", _MATMUL), ("elementwise", _ELEMENTWISE),
                         ("reduction/norm/loss", _REDUCTION), ("memory/layout", _MEMORY)):
        if short in names:
            return group
    return "other"


def _phase_of(event) -> str | None:
    node = event
    while node is not None:
        if node.name in PHASES:
            return node.name
        node = node.cpu_parent
    return None


def summarize_events(events) -> dict[str, Any]:
    """Group profiler function events: self-time per group, time per phase, the top operators."""
    groups: dict[str, float] = defaultdict(float)
    phases: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name in PHASES:
            phases[event.name.removeprefix("bench/")] += event.cpu_time_total / 1e3
            continue
        self_ms = event.self_cpu_time_total / 1e3
        phase = _phase_of(event)
        group = "optimizer" if phase == "bench/optimizer" else classify(event.name)
        groups[group] += self_ms
        ops[event.name] += self_ms
    top = sorted(ops.items(), key=lambda item: -item[1])[:10]
    return {
        "groups_ms": {g: round(groups.get(g, 0.0), 3) for g in GROUPS},
        "phases_ms": {p.removeprefix("bench/"): round(phases.get(p.removeprefix("bench/"), 0.0), 3) for p in PHASES},
        "top_ops_ms": [[name, round(ms, 3)] for name, ms in top],
    }


def profile_step(step: Callable[[], None], device) -> dict[str, Any]:
    """Run `step` once under torch.profiler and return its grouped summary."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    summary = summarize_events(prof.events())
    if device.type == "cuda":
        summary["cuda_total_ms"] = round(sum(e.self_device_time_total for e in prof.key_averages()) / 1e3, 3)
    return summary
