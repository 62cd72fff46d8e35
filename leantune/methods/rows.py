"""One adapter per batch row: the batched forward of one targeted module for a mixed batch.

Every routable adapter of a module is written in one row form,

    y = post ⊙ (W (pre ⊙ x) + B A x) + bias_scale ⊙ b

(LoRA: B A = s B A; DoRA: post = m / ‖W + s B A‖_row; IA³: pre or post = l; PaCA: A selects its
columns, B = s Δ; PiSSA over the original weight: A = [A; A0], B = [s B, −s B0]). The forms of
all adapters stacked on the module are stacked once into [N+1, ...] tensors (the last entry is the
base model: no update), zero-padded to the largest rank, and cached until an adapter tensor
or the base weight (by its version) changes. A forward groups the rows by adapter (`_Groups`:
rows of one adapter side by side, a heavy adapter split into several groups so no group pads
much) and runs two batched products (`torch.bmm`) over all groups at once, reading each
adapter's factors once rather than copying them for every row: no loop over adapters. Groups
follow the rows' order, so a batch whose rows of one adapter sit together (every row its own
adapter, or one adapter for all) needs no copy of its activations either.

Rows run as in eval mode (no dropout); the module's base weight is its original (`clean_weight`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .. import kernels
from ..errors import LeantuneError


@dataclass
class RowForm:
    """One adapter's update of one module (None: that part is the identity or zero)."""

    a: torch.Tensor | None = None  # [r, in]
    b: torch.Tensor | None = None  # [out, r], the scale folded in
    pre: torch.Tensor | None = None  # [in]
    post: torch.Tensor | None = None  # [out]
    post_scales_bias: bool = False


@dataclass
class _Stacked:
    snapshot: list[torch.Tensor]
    names: dict[str, int]
    weight: torch.Tensor
    bias: torch.Tensor | None
    a: torch.Tensor | None  # [N+1, r_max, in]
    b: torch.Tensor | None  # [N+1, out, r_max]
    pre: torch.Tensor | None  # [N+1, in]
    post: torch.Tensor | None  # [N+1, out]
    bias_scale: torch.Tensor | None  # [N+1, out]
    layout: int | None = None  # the router's layout it was last checked at, under trust_versions
    innermost: nn.Module | None = None  # the stack's innermost layer, whose clean_weight() undoes base edits
    groups: "_Groups | None" = None  # the last batch's grouping (the same rows at every decode step)
    weight_version: int | None = -1  # the base weight's version at the build (DoRA's norms are taken over it)


@dataclass
class _Groups:
    """How one batch's rows meet the stacked factors: group g holds rows `gather[g]` (a short
    group padded with row 0, whose output there is never read) and runs the factors `a[g]`,
    `b[g]` (views of the stack when the groups' adapters are consecutive entries of it, as one
    adapter is; else gathered once for these rows, which stay the same through a generation's
    decode steps). Row `targets[k]`'s update is slot `slots[k]` of the groups' output flattened.
    `in_order`: the groups hold every row once, in order, so no copy of the activations is needed."""

    rows: tuple[str | None, ...]
    index: torch.Tensor  # [rows]: each row's entry in the stack (the last one: the base)
    gather: torch.Tensor | None = None  # [groups, size]
    in_order: bool = False
    targets: torch.Tensor | None = None  # [rows with an adapter]
    slots: torch.Tensor | None = None
    a: torch.Tensor | None = None  # [groups, r_max, in]
    b: torch.Tensor | None = None  # [groups, out, r_max]


def version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for a tensor made under inference_mode, which has none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def layer_stack(outer: nn.Module) -> list[nn.Module]:
    """The adapter layers wrapped around one module, outermost first."""
    stack = []
    module = outer
    while hasattr(module, "row_form"):
        stack.append(module)
        module = module.base_layer
    return stack


def clean_stack_weight(stack: Sequence[nn.Module]) -> torch.Tensor:
    """The base weight under `stack` (outermost first) with none of its adapters applied (PiSSA's
    original weight, not its residual; PaCA's columns taken back out)."""
    weight = stack[-1].clean_weight()
    for layer in stack[:-1]:
        weight = layer.clean_weight(weight)
    return weight


def _sources(stack: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Every tensor the stacked forms are computed from (the base layer's excluded: it is frozen;
    parameters are in the state dict, so each tensor is read once)."""
    return [t for layer in stack for t in layer.adapter_state_dict().values()]


def _unchanged(snapshot: list[torch.Tensor], live: list[torch.Tensor]) -> bool:
    # Compared by value, not by version counter: a `.data` write or a no-grad copy_ on `.data`
    # leaves the counter as it was. The cost is two reads of the adapters' tensors (comparing one
    # concatenation per module instead of each tensor was measured slower).
    return len(snapshot) == len(live) and all(
        a.shape == b.shape and a.device == b.device and a.dtype == b.dtype and torch.equal(a, b)
        for a, b in zip(snapshot, live))  # a model moved or cast since keeps its Parameter objects


def _stack(parts: list[torch.Tensor | None], shape: tuple[int, ...], fill: float, like: torch.Tensor) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    full = [torch.full(shape, fill, dtype=like.dtype, device=like.device) if p is None else p.to(like.dtype)
            for p in parts]
    return torch.stack(full + [torch.full(shape, fill, dtype=like.dtype, device=like.device)])


def _stack_factors(forms: list[RowForm], out_features: int, in_features: int, like: torch.Tensor):
    ranks = [0 if f.a is None else f.a.shape[0] for f in forms]
    r_max = max(ranks)
    if r_max == 0:
        return None, None
    a = torch.zeros(len(forms) + 1, r_max, in_features, dtype=like.dtype, device=like.device)
    b = torch.zeros(len(forms) + 1, out_features, r_max, dtype=like.dtype, device=like.device)
    for i, (form, r) in enumerate(zip(forms, ranks)):
        if r:
            a[i, :r] = form.a.to(like.dtype)
            b[i, :, :r] = form.b.to(like.dtype)
    return a, b


@torch.no_grad()
def _build(outer: nn.Module, stack: list[nn.Module], snapshot: list[torch.Tensor]) -> _Stacked:
    base = stack[-1].base_layer
    weight = clean_stack_weight(stack)
    forms = [layer.row_form() for layer in stack]
    out_features, in_features = weight.shape
    like = weight if weight.is_floating_point() else torch.empty(0)
    a, b = _stack_factors(forms, out_features, in_features, like)
    bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
    post = _stack([f.post for f in forms], (out_features,), 1.0, like)
    bias_scale = None
    if bias is not None and post is not None:
        bias_scale = _stack([f.post if f.post_scales_bias else None for f in forms], (out_features,), 1.0, like)
    return _Stacked(snapshot, {layer.routing_name(): i for i, layer in enumerate(stack)}, weight, bias, a, b,
                    _stack([f.pre for f in forms], (in_features,), 1.0, like), post, bias_scale)


def stacked_forms(outer: nn.Module, layout: int | None = None) -> _Stacked:
    """The stacked forms of `outer`'s stack, rebuilt when any adapter tensor of it changed.

    `layout` (the router's, given under trust_versions: the server, whose engine alone changes
    adapters, and only by attaching, detaching or loading them): while it is the one the cached
    forms were checked at, they are returned without walking the stack or reading any tensor.
    """
    cached: _Stacked | None = outer.__dict__.get("_row_forms")
    if layout is not None and cached is not None and cached.layout == layout:
        if cached.innermost.cleans_base_in_place:
            cached.innermost.clean_weight()  # a plain forward since may have placed PaCA's columns
        return cached
    stack = layer_stack(outer)
    for layer in stack:
        layer.check_routable()
    weight = stack[-1].clean_weight()  # PaCA takes its columns back out of the base weight if a forward placed them
    live = _sources(stack)
    if (cached is None or cached.weight is not weight or cached.weight_version != version_of(weight)
            or not _unchanged(cached.snapshot, live)):
        cached = _build(outer, stack, [t.detach().clone() for t in live])
        cached.weight_version = version_of(weight)
        outer.__dict__["_row_forms"] = cached
    cached.layout, cached.innermost = layout, stack[-1]
    return cached


def _group(rows: tuple[str | None, ...], forms: _Stacked, device: torch.device) -> _Groups:
    names = forms.names
    entries = [names.get(name, len(names)) if name is not None else len(names) for name in rows]
    members: dict[int, list[int]] = {}  # adapters in the order of their first row
    for row, entry in enumerate(entries):
        if entry != len(names):
            members.setdefault(entry, []).append(row)
    index = torch.tensor(entries, device=device)
    if not members or forms.a is None:
        return _Groups(rows, index)
    # Groups of at most `size` rows: an adapter with many rows takes several groups, so padding
    # stays under one group per adapter (at most twice the rows' work), whatever the mix.
    size = -(-sum(len(m) for m in members.values()) // len(members))
    gather, adapters, targets, slots = [], [], [], []
    for entry, member_rows in members.items():
        for start in range(0, len(member_rows), size):
            chunk = member_rows[start:start + size]
            targets += chunk
            slots += range(len(gather) * size, len(gather) * size + len(chunk))
            gather.append(chunk + [0] * (size - len(chunk)))
            adapters.append(entry)
    first = adapters[0]
    if adapters == list(range(first, first + len(adapters))):  # consecutive entries (one adapter, or all in order)
        a, b = forms.a[first:first + len(adapters)], forms.b[first:first + len(adapters)]
    else:
        chosen = torch.tensor(adapters, device=forms.a.device)
        a, b = forms.a[chosen], forms.b[chosen]
    in_order = [row for chunk in gather for row in chunk] == list(range(len(rows)))
    as_tensor = lambda values: torch.tensor(values, device=device)  # noqa: E731
    return _Groups(rows, index, as_tensor(gather), in_order, as_tensor(targets), as_tensor(slots), a, b)


def _add_grouped_update(y: torch.Tensor, groups: _Groups, h: torch.Tensor) -> torch.Tensor:
    """y plus B A h for every row with its own adapter's factors (y, h: [rows, tokens, features])."""
    tokens = h.shape[1]
    count, size = groups.gather.shape
    x = h if groups.in_order else h[groups.gather]  # [groups, size, tokens, in] in effect
    out = torch.bmm(torch.bmm(x.reshape(count, size * tokens, -1), groups.a.transpose(1, 2)),
                    groups.b.transpose(1, 2)).reshape(count * size, tokens, -1)
    if groups.in_order:
        return y + out
    return y.index_add_(0, groups.targets, out.index_select(0, groups.slots))


def routed_forward(outer: nn.Module, x: torch.Tensor, rows: Sequence[str | None],
                   layout: int | None = None) -> torch.Tensor:
    """The module's output for a batch whose row i runs adapter rows[i] (None: the base model);
    `layout`: the router's, when adapters are trusted to change only through it (`stacked_forms`)."""
    if x.dim() < 2 or x.shape[0] != len(rows):
        raise LeantuneError(f"adapter_names has {len(rows)} entries but the batch has "
                            f"{x.shape[0] if x.dim() else 0} rows; give one adapter name (or None) per row")
    forms = stacked_forms(outer, layout)
    rows = tuple(rows)
    if forms.groups is None or forms.groups.rows != rows or forms.groups.index.device != x.device:
        forms.groups = _group(rows, forms, x.device)
    index = forms.groups.index
    shape = x.shape
    h = x.reshape(shape[0], -1, shape[-1]).to(forms.weight.dtype)
    inputs = h * forms.pre[index][:, None, :] if forms.pre is not None else h
    y = kernels.linear(inputs, forms.weight)
    if forms.groups.gather is not None:
        y = _add_grouped_update(y, forms.groups, h)
    if forms.post is not None:
        y = y * forms.post[index][:, None, :]
    if forms.bias is not None:
        bias = forms.bias.to(y.dtype)
        y = y + (bias * forms.bias_scale[index][:, None, :] if forms.bias_scale is not None else bias)
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)

