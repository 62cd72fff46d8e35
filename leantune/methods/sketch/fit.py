"""Fitting a sketch: tables by weighted k-means, codes by an error-feedback sweep, block by block.

For each decoder block in order, the calibration activations (computed with the blocks before
it already sketched) give every targeted linear its input Hessian H = XᵀX / N; linears that read
the same input tensor (q/k/v, gate/up) share one H and are fitted together as one stack of rows.
Each row (or group of columns in a row) gets a 2^bits-entry table from a k-means of its weights
weighted by 1 / diag(H⁻¹) (the cost of rounding a weight in the OBS sense). Then the columns are
assigned to their nearest entries left to right while each rounding error is pushed onto the
columns not yet assigned through the Cholesky factor of H⁻¹, as in GPTQ.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ...errors import LeantuneError
from ..layer import one_cpu_thread
from .hessian import HessianAccumulator, dead_columns, inverse_cholesky_factor, relative_output_error
from .pack import MAX_BITS, LayerSketch, Sketch, model_identity, pack_codes, rebuild_weight


@dataclass
class FitSettings:
    bits: int = 4
    groups_per_row: int = 1
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    kmeans_iters: int = 15
    table_dtype: torch.dtype = torch.float16
    batch_size: int = 8


# -- tables: weighted k-means over all rows at once ------------------------------------------

def weighted_kmeans(values: torch.Tensor, weights: torch.Tensor, entries: int, iters: int) -> torch.Tensor:
    """Per-row 1-D weighted k-means: values R x n, weights R x n (>= 0) -> sorted centres R x entries.

    Starts from weighted quantiles (deterministic); in one dimension the nearest centre is found by
    a search among the midpoints of the sorted centres, so one step is a searchsorted and two
    scatter-adds over all rows together.
    """
    values = values.float()
    weights = weights.float().expand_as(values)
    order = values.argsort(dim=1)
    sorted_values = values.gather(1, order)
    cumulative = weights.gather(1, order).cumsum(1)
    fractions = (torch.arange(entries, dtype=values.dtype, device=values.device) + 0.5) / entries
    targets = fractions[None, :] * cumulative[:, -1:]
    positions = torch.searchsorted(cumulative, targets).clamp_(max=values.shape[1] - 1)
    centres = sorted_values.gather(1, positions)
    weighted_values = weights * values
    previous = None
    for _ in range(iters):
        assignment = nearest_sorted_entry(centres, values)
        if previous is not None and torch.equal(assignment, previous):
            break  # converged: the centres would not move
        mass = torch.zeros_like(centres).scatter_add_(1, assignment, weights)
        total = torch.zeros_like(centres).scatter_add_(1, assignment, weighted_values)
        centres = torch.where(mass > 0, total / mass.clamp_min(torch.finfo(mass.dtype).tiny), centres)
        centres = centres.sort(dim=1).values
        previous = assignment
    return centres


def nearest_sorted_entry(sorted_entries: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's sorted table: R x K entries, R x n values -> R x n."""
    midpoints = (sorted_entries[:, 1:] + sorted_entries[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())


def initial_tables(weight: torch.Tensor, importance: torch.Tensor, bits: int, groups: int, iters: int) -> torch.Tensor:
    """out x in weights, per-column importance (in) -> tables out x groups x 2^bits."""
    out_features, in_features = weight.shape
    group_size = in_features // groups
    values = weight.reshape(out_features * groups, group_size)
    weights = importance.view(1, groups, group_size).expand(out_features, groups, group_size)
    centres = weighted_kmeans(values, weights.reshape(out_features * groups, group_size), 2 ** bits, iters)
    return centres.view(out_features, groups, 2 ** bits)


# -- codes: the error-feedback sweep ---------------------------------------------------------

def error_feedback_sweep(weight: torch.Tensor, tables: torch.Tensor, column_groups: torch.Tensor,
                         factor: torch.Tensor, block_size: int) -> torch.Tensor:
    """Assign every column to its nearest table entry, propagating rounding errors (GPTQ/OBS).

    weight: out x in (float32, in sweep order); tables: out x groups x K; column_groups: the group of
    each column (in); factor: upper U with H⁻¹ = UᵀU (in sweep order). Returns codes out x in (int64).
    """
    weight = weight.clone()
    out_features, in_features = weight.shape
    factor = factor.to(weight.dtype)
    codes = torch.empty(out_features, in_features, dtype=torch.int64, device=weight.device)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = weight[:, start:stop].clone()
        errors = torch.empty_like(block)
        local = factor[start:stop, start:stop]
        for i in range(stop - start):
            column = block[:, i]
            table = tables[:, column_groups[start + i]]
            code = (column[:, None] - table).abs().argmin(dim=1)
            rounded = table.gather(1, code[:, None]).squeeze(1)
            codes[:, start + i] = code
            error = (column - rounded) / local[i, i]
            block[:, i:].sub_(error[:, None] * local[i, i:][None, :])
            errors[:, i] = error
        weight[:, stop:].sub_(errors @ factor[start:stop, stop:])
    return codes


def nearest_entry_codes(weight: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Plain rounding: every weight to its nearest table entry, no error feedback (the baseline)."""
    out_features, groups, _ = tables.shape
    grouped = weight.view(out_features, groups, -1)
    return (grouped[..., None] - tables[:, :, None, :]).abs().argmin(dim=-1).view(out_features, -1)


def check_group_layout(name: str, in_features: int, groups: int) -> None:
    if in_features % (2 * groups):
        raise LeantuneError(
            f"'{name}' has in_features={in_features}, which is not divisible by 2 x groups_per_row = {2 * groups} "
            "(codes are packed two per byte within each group)")


def fit_weight(weight: torch.Tensor, hessian: torch.Tensor, settings: FitSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one stack of rows that share `hessian`: returns (codes out x in int64, tables out x G x K float32)."""
    with one_cpu_thread(weight.device):
        return _fit_weight(weight, hessian, settings)


def _fit_weight(weight: torch.Tensor, hessian: torch.Tensor, settings: FitSettings) -> tuple[torch.Tensor, torch.Tensor]:
    weight = weight.detach().float()
    in_features = weight.shape[1]
    groups = settings.groups_per_row
    factor = inverse_cholesky_factor(hessian, settings.damp)
    inverse_diagonal = (factor * factor).sum(0)  # diag(UᵀU) = diag(H⁻¹)
    importance = (1.0 / inverse_diagonal).float()
    importance[dead_columns(hessian)] = 0.0
    importance.clamp_(min=1e-8 * float(importance.max()))
    tables = initial_tables(weight, importance, settings.bits, groups, settings.kmeans_iters)
    tables = tables.to(settings.table_dtype).float()  # the sweep rounds to the values that will be stored
    column_groups = torch.arange(in_features, device=weight.device) // (in_features // groups)
    if settings.act_order:
        order = torch.argsort(torch.diagonal(hessian), descending=True)
        factor = inverse_cholesky_factor(hessian[order][:, order], settings.damp)
        codes = torch.empty(weight.shape, dtype=torch.int64, device=weight.device)
        codes[:, order] = error_feedback_sweep(weight[:, order], tables, column_groups[order], factor, settings.block_size)
    else:
        codes = error_feedback_sweep(weight, tables, column_groups, factor, settings.block_size)
    return codes, tables


# -- the calibration pass, block by block ---------------------------------------------------

class _StopForward(Exception):
    """Raised by the hook that captures the first block's inputs: nothing after it needs to run."""


def decoder_blocks(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of blocks that holds every targeted linear (e.g. 'model.layers')."""
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(n.startswith(f"{prefix}.") for n in names):
            if all(n[len(prefix) + 1:].split(".")[0].isdigit() for n in names):
                return prefix, module
    raise LeantuneError("sketch fitting needs every targeted linear inside one list of decoder blocks "
                        f"(e.g. model.layers.N...); got {names[0]!r}")


def _capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor,
                          batch_size: int) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    outputs = []
    for args, kwargs in inputs:
        result = block(*args, **kwargs)
        outputs.append(result[0] if isinstance(result, (tuple, list)) else result)
    return outputs


def _block_hessians(block: nn.Module, inputs: list[tuple[tuple, dict]], linears: dict[str, nn.Linear]
                    ) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Run the block over the calibration batches; one Hessian per distinct input tensor.

    Returns {leader name: (names of the linears reading that input, H)}. Linears that read the
    very same tensor object (found on the first batch) share their leader's Hessian.
    """
    leader_of: dict[str, str] = {}
    accumulators: dict[str, HessianAccumulator] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # holds the tensors so their ids stay unique

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            if name not in leader_of:
                leader_of[name] = seen[id(x)][1] if id(x) in seen else name
                seen.setdefault(id(x), (x, name))
            if leader_of[name] == name:
                accumulators.setdefault(name, HessianAccumulator(x.shape[-1], x.device)).add(x)
        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in linears.items()]
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                block(*args, **kwargs)
                seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[str, tuple[list[str], torch.Tensor]] = {}
    for name in linears:
        if name not in leader_of:
            raise LeantuneError(f"calibration data never reached '{name}'")
        leader = leader_of[name]
        if leader not in groups:
            groups[leader] = ([], accumulators[leader].hessian())
        groups[leader][0].append(name)
    return groups


def fit_sketch(model: nn.Module, input_ids: torch.Tensor, names: list[str], settings: FitSettings,
               progress: Callable[[dict[str, Any]], None] | None = None) -> tuple[Sketch, dict[str, Any]]:
    """Fit a sketch of the linears `names` of `model` on calibration token ids (samples x seq_len).

    The model is left as it was (each block's dense weights are restored after its outputs are
    computed with the sketched weights). Returns the sketch and a report with per-layer errors.
    """
    if not 1 <= settings.bits <= MAX_BITS:
        raise LeantuneError(f"sketchtune: 'bits' must be between 1 and {MAX_BITS}, got {settings.bits}")
    for name in names:
        module = model.get_submodule(name)
        check_group_layout(name, module.in_features, settings.groups_per_row)
    started = time.perf_counter()
    model_id = model_identity(model)
    prefix, blocks = decoder_blocks(model, names)
    by_block: dict[int, dict[str, nn.Linear]] = {}
    for name in names:
        index = int(name[len(prefix) + 1:].split(".")[0])
        by_block.setdefault(index, {})[name] = model.get_submodule(name)
    layers: dict[str, LayerSketch] = {}
    report: dict[str, Any] = {"layers": {}, "calibration_seconds": 0.0}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = _capture_block_inputs(model, blocks[0], input_ids, settings.batch_size)
            last = max(by_block)
            for index in range(last + 1):
                targeted = by_block.get(index, {})
                outputs = _fit_block(blocks[index], inputs, targeted, settings, layers, report, progress,
                                     need_outputs=index < last)
                inputs = [_with_hidden(args, kwargs, hidden) for (args, kwargs), hidden in zip(inputs, outputs)]
    finally:
        model.train(was_training)
    report["fit_seconds"] = time.perf_counter() - started
    report["table_seconds"] = sum(info["seconds"] for info in report["layers"].values())
    sketch = Sketch(layers=layers, bits=settings.bits, groups_per_row=settings.groups_per_row,
                    model_name=getattr(getattr(model, "config", None), "_name_or_path", None), model_id=model_id)
    return sketch, report


def _fit_block(block: nn.Module, inputs: list[tuple[tuple, dict]], targeted: dict[str, nn.Linear],
               settings: FitSettings, layers: dict[str, LayerSketch], report: dict[str, Any],
               progress: Callable[[dict[str, Any]], None] | None, need_outputs: bool) -> list[torch.Tensor]:
    """Fit the block's targeted linears, then run it with Ŵ in place of W (restored afterwards)."""
    started = time.perf_counter()
    shared = _block_hessians(block, inputs, targeted) if targeted else {}
    report["calibration_seconds"] += time.perf_counter() - started
    originals: dict[str, torch.Tensor] = {}
    try:
        for members, hessian in shared.values():
            for name, (sketch_layer, approx) in _fit_group(members, hessian, targeted, settings, report,
                                                           progress).items():
                layers[name] = sketch_layer
                originals[name] = targeted[name].weight.detach().clone()
                targeted[name].weight.copy_(approx.to(targeted[name].weight.dtype))
        started = time.perf_counter()
        outputs = _run_block(block, inputs) if need_outputs else []
        report["calibration_seconds"] += time.perf_counter() - started
        return outputs
    finally:
        for name, weight in originals.items():
            targeted[name].weight.copy_(weight)


def _fit_group(members: list[str], hessian: torch.Tensor, linears: dict[str, nn.Linear], settings: FitSettings,
               report: dict[str, Any], progress: Callable[[dict[str, Any]], None] | None
               ) -> dict[str, tuple[LayerSketch, torch.Tensor]]:
    """Fit the linears that share one Hessian as a single stack of rows, then split them apart."""
    started = time.perf_counter()
    weights = [linears[name].weight.detach().float() for name in members]
    codes, tables = fit_weight(torch.cat(weights), hessian, settings)
    elapsed = (time.perf_counter() - started) / len(members)
    result, row = {}, 0
    for name, weight in zip(members, weights):
        rows = slice(row, row + weight.shape[0])
        row += weight.shape[0]
        stored_tables = tables[rows].to(settings.table_dtype).contiguous()
        approx = rebuild_weight(codes[rows], stored_tables.float())
        error = relative_output_error(weight, approx, hessian)
        result[name] = (LayerSketch(packed_codes=pack_codes(codes[rows]), tables=stored_tables), approx)
        report["layers"][name] = {"relative_error": error, "seconds": elapsed}
        if progress is not None:
            progress({"name": name, "relative_error": error, "seconds": elapsed})
    return result
