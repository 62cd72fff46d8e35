"""The columns PaCA writes into a base weight: their original values, and which contributions they hold.

Several PaCA adapters may sit on one linear, with overlapping column sets. One `ColumnLedger`
per base linear keeps the original values of every column any of them selected (exact restore
for unmerge / disabled / detach) and knows which contributions the weight holds right now; a
`ColumnPlan` records what one forward placed, so its backward differentiates exactly that. On
an NF4 base (QPaCA) the ledger keeps the adapted columns in full precision and places them into
the freshly dequantized weight at every use.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layer import WEIGHT_WATCHER_ATTR, one_cpu_thread

if TYPE_CHECKING:  # the layers own a ledger; the ledger only reads their fields
    from .paca import PaCALayer


class ColumnPlan:
    """What one adapted forward used: the contributions in the weight (the live deltas' values as
    placed), and the live deltas to train."""

    __slots__ = ("ledger", "key", "values", "live", "merged", "deltas", "gather", "positions", "scales")

    def __init__(self, ledger: "ColumnLedger", live: list[PaCALayer], merged: list[PaCALayer], key: tuple,
                 values: tuple[torch.Tensor, ...]):
        self.ledger = ledger
        self.live, self.merged = live, merged
        self.key, self.values = key, values
        self.deltas = [layer.paca_delta for layer in live]
        self.scales = [layer.scale for layer in live]
        if len(live) == 1:  # the common case: save exactly X[..., I]
            self.gather, self.positions = live[0].paca_index, None
        else:
            self.gather = ledger.index
            self.positions = [ledger.positions(layer) for layer in live]

    def ensure(self) -> None:
        """Put back the columns this plan's forward used if anything (a disabled forward, a changed
        Δ and the forward that followed) replaced them: backward differentiates that forward."""
        if self.ledger.placed_key != self.key or self.ledger.placed_values is not self.values:
            self.ledger.place(self.live, self.merged, self.key, self.values)

    def weight(self) -> torch.Tensor:
        return self.ledger.effective_weight()


class ColumnLedger:
    """The PaCA layers stacked on one base linear, the original values of their columns, and
    which contributions those columns hold right now.

    `orig` holds the base columns at `index` (the sorted union of the members' columns) without
    any PaCA contribution. A dense base holds W0 + the placed contributions in its weight; an NF4
    base keeps its packed weight (with merged contributions requantized into it) and the ledger
    keeps the adapted columns in `columns`, placed into each dequantized copy.
    """

    def __init__(self, base: nn.Module):
        self.base = base
        self.quantized = callable(getattr(base, "dequantize_weight", None))
        self.members: list[PaCALayer] = []
        self.index = torch.empty(0, dtype=torch.long)
        self.orig = torch.empty(0)
        self.placed_key: tuple | None = ()  # () = the base columns hold no contribution
        self.placed_values: tuple[torch.Tensor, ...] = ()  # copies of the live deltas as placed
        self.written: torch.Tensor | None = None  # dense base: what the ledger last wrote into its columns
        self.written_ptr = 0  # ... and into which tensor (a swap, as torch.func.functional_call makes, is seen)
        self.swapped_out: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (ptr, orig, written) of the last
        self.columns: torch.Tensor | None = None  # NF4 base: the placed columns
        self.base_key: tuple = ()  # NF4 base: the merged contributions requantized into the packed weight
        self.pristine: torch.Tensor | None = None  # NF4 base: packed weight before any merge
        base.__dict__[WEIGHT_WATCHER_ATTR] = self
        # A state_dict (a Trainer's checkpoint, accelerate's save_state, torch.save of the model) takes
        # the base weight as W0 plus merged contributions, as LoRA's holds W0: a live Δ placed in the
        # columns would be added twice by a model that loads the dict and then places its own Δ.
        self._state_hook = base.register_state_dict_pre_hook(self._clean_before_state_dict)

    # -- membership -----------------------------------------------------------------------
    def join(self, layer: PaCALayer) -> None:
        self._restore_base()
        self.members.append(layer)
        self._capture()

    def leave(self, layer: PaCALayer, keep: bool) -> None:
        """Remove `layer`; with keep, its merged contribution becomes part of the base."""
        if keep and layer.contribution() is not None:
            self._bake(layer)
        self._restore_base()
        self.members.remove(layer)
        if not self.members:
            self.base.__dict__.pop(WEIGHT_WATCHER_ATTR, None)
            self._state_hook.remove()
        self._capture()

    def reindex(self) -> None:
        """A member's columns changed (adapter load): recapture the originals."""
        self._restore_base()
        self._capture()

    def _capture(self) -> None:
        """Read the original columns for the union of the members' indices (base holds no contribution)."""
        weight_device = self.base.weight.device
        if self.members:
            self.index = torch.unique(torch.cat([m.paca_index for m in self.members])).to(weight_device)
        else:
            self.index = torch.empty(0, dtype=torch.long, device=weight_device)
        with torch.no_grad():
            dense = self._pristine_dense()
            self.orig = dense.index_select(1, self.index).clone()
        if not self.quantized:
            self._note_written(self.orig.clone())  # what the base's columns hold now
        self.placed_key, self.columns = (), None
        self.sync_base()

    def _pristine_dense(self) -> torch.Tensor:
        if not self.quantized:
            return self.base.weight.detach()
        if self.pristine is not None:
            with _packed(self.base, self.pristine):
                return self.base.dequantize_weight()
        return self.base.dequantize_weight()

    def _restore_base(self) -> None:
        """Remove every contribution, merged ones included: the base is exactly W0 again."""
        self.adopt_outside_writes()
        with torch.no_grad():
            if self.quantized:
                if self.pristine is not None:
                    self.base.weight.copy_(self.pristine)
                    self.pristine = None
                self.base_key = ()
            elif self.index.numel():
                self._match_device()
                self._write(self.orig)
        self.placed_key, self.columns = (), None

    def _bake(self, layer: PaCALayer) -> None:
        """Make `layer`'s merged contribution part of the original columns (detach keep_merged)."""
        self.adopt_outside_writes()
        with torch.no_grad():
            positions = self.positions(layer)
            self.orig = self.orig.clone()
            self.orig.index_add_(1, positions, (layer.scale * layer.contribution()).to(self.orig.dtype))
            if self.quantized:
                dense = self._pristine_dense()
                dense.index_copy_(1, self.index, self.orig.to(dense.dtype))
                self.pristine = None
                self.base.quantize_(dense)
            else:
                self._write(self.orig)
        self.placed_key, self.base_key, self.columns = (), (), None

    def positions(self, layer: PaCALayer) -> torch.Tensor:
        return torch.searchsorted(self.index, layer.paca_index)

    # -- which contributions, and writing them ------------------------------------------
    @staticmethod
    def state_key(live: list[PaCALayer], merged: list[PaCALayer]) -> tuple:
        """Which contributions: the live members and the merge snapshots (Δ's values are compared apart)."""
        return tuple(id(m) for m in live), tuple(m._merge_generation for m in merged)

    def plan(self, layer: PaCALayer) -> ColumnPlan:
        """Place the columns `layer`'s adapted forward needs: every merged member, plus the live
        (not merged, not disabled) members at or below `layer`.

        Δ's values are compared with the placed copy at every forward (O(out × r), next to the
        matmul's O(tokens × in × out)): writes through `.data`, `copy_` under no_grad or a whole
        new tensor all bypass what a version counter or an optimizer hook would see."""
        self.adopt_outside_writes()
        live, merged = self.running(layer)
        key = self.state_key(live, merged)
        if self.placed_key != key or not _same_values(self.placed_values, live):
            self.place(live, merged, key, tuple(m.paca_delta.detach().clone() for m in live))
        return ColumnPlan(self, live, merged, key, self.placed_values)

    def sync_base(self) -> None:
        """Make the base module itself hold exactly W0 plus the merged contributions."""
        self.adopt_outside_writes()
        merged = [m for m in self.members if m.merged]
        if self.quantized:
            key = tuple(m._merge_generation for m in merged)
            if key != self.base_key:
                self._requantize(merged)
                self.base_key = key
            return
        key = self.state_key([], merged)
        if self.placed_key != key:
            self.place([], merged, key, ())

    def compose(self, live: list[PaCALayer], merged: list[PaCALayer],
                values: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """orig + the scaled contributions (live members at `values`), for all columns at `index`."""
        parts = list(zip(live, values)) + [(m, m.contribution()) for m in merged]
        acc = torch.promote_types(self.orig.dtype, torch.float32)
        if len(parts) == 1 and parts[0][0].r == self.index.numel():  # one member owns every column
            layer, delta = parts[0]
            return torch.add(self.orig.to(acc), delta.to(acc), alpha=layer.scale)
        columns = self.orig.to(acc, copy=True)
        for layer, delta in parts:
            columns.index_add_(1, self.positions(layer), delta.to(acc), alpha=layer.scale)
        return columns

    def place(self, live: list[PaCALayer], merged: list[PaCALayer], key: tuple,
              values: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad(), one_cpu_thread(self.orig.device):
            self._match_device()
            columns = self.compose(live, merged, values)
            if self.quantized:
                self.columns = columns.to(self.base.dtype)
            else:
                self._write(columns)
        self.placed_key, self.placed_values = key, values

    def _write(self, columns: torch.Tensor) -> None:
        """Write `columns` into a dense base's weight at `index`, and remember what was written."""
        self._note_written(columns.to(self.base.weight.dtype, copy=True))
        self.base.weight.index_copy_(1, self.index, self.written)

    def _note_written(self, columns: torch.Tensor) -> None:
        self.written, self.written_ptr = columns, self.base.weight.data_ptr()

    def _clean_before_state_dict(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        self.sync_base()  # the next adapted forward places the live columns again (O(out x r))

    def library_wrote(self) -> None:
        """The library wrote the base weight: an adapter stacked above merged or unmerged (its backup
        keeps the originals exact), or the model was cast or moved. The ledger only notes that the
        columns as they stand are its own."""
        if self.quantized or self.written is None or not self.index.numel():
            return
        self._match_device()
        self._note_written(self.base.weight.detach().index_select(1, self.index))

    def adopt_outside_writes(self) -> None:
        """Take in what was written into a dense base's columns from outside since the ledger last
        wrote them (load_state_dict, copy_, a `.data` write, a new Parameter, a checkpoint loaded
        after attaching): such a value is the new original of its element, so the adapted, disabled
        and detached weights all build on it instead of on the columns read at attach time. Found
        by value, as `plan` finds changes of Δ: no version counter sees a `.data` write."""
        if self.quantized or self.written is None or not self.index.numel():
            return
        self._match_device()
        weight = self.base.weight
        with torch.no_grad():
            current = weight.detach().index_select(1, self.index)
            if weight.data_ptr() != self.written_ptr:
                self._swap_tensors(weight.data_ptr())
            if torch.equal(current, self.written):
                return
            outside = current != self.written
            self.orig = torch.where(outside, current.to(self.orig.dtype), self.orig)
            self._note_written(current)
        self.placed_key, self.placed_values = None, ()  # what the columns hold is no longer the ledger's

    def _swap_tensors(self, ptr: int) -> None:
        """The base weight is another tensor than the one last written. Back to the one before (the end
        of a functional_call): its accounts come back. Otherwise (a copy by deepcopy or pickle, a new
        Parameter, `.data = ...`) its columns are compared with what was written, as for any write."""
        kept, self.swapped_out = self.swapped_out, (self.written_ptr, self.orig, self.written)
        if kept is not None and kept[0] == ptr:
            _, self.orig, self.written = kept
        self.written_ptr = ptr
        self.placed_key, self.placed_values = None, ()

    def _requantize(self, merged: list[PaCALayer]) -> None:
        """NF4 base: merged contributions are requantized into the packed weight; none merged: the exact original."""
        with torch.no_grad():
            if not merged:
                if self.pristine is not None:
                    self.base.weight.copy_(self.pristine)
                    self.pristine = None
                return
            if self.pristine is None:
                self.pristine = self.base.weight.detach().clone()
            dense = self._pristine_dense()
            dense.index_copy_(1, self.index, self.compose([], merged, ()).to(dense.dtype))
            self.base.quantize_(dense)

    def _match_device(self) -> None:
        """Follow the base if the model was moved or cast after attaching."""
        weight = self.base.weight
        dtype = self.base.dtype if self.quantized else weight.dtype
        if self.orig.device != weight.device or self.orig.dtype != dtype:
            self.orig = self.orig.to(device=weight.device, dtype=dtype)
            self.index = self.index.to(weight.device)
            if self.written is not None:  # a cast or a move, not an outside write: the columns are the ledger's, rounded
                self._note_written(weight.detach().index_select(1, self.index))

    def running(self, layer: PaCALayer) -> tuple[list[PaCALayer], list[PaCALayer]]:
        """What `layer`'s forward runs: the live (not merged, not disabled) members at or below it,
        and every merged member."""
        below = self.members[:self.members.index(layer) + 1]
        return [m for m in below if not (m.merged or m.disabled)], [m for m in self.members if m.merged]

    def weight_for(self, layer: PaCALayer) -> torch.Tensor:
        """A copy of the dense weight `layer` runs with as things stand: the merged members, and the
        running members at or below it, over the original columns."""
        self.adopt_outside_writes()
        live, merged = self.running(layer)
        with torch.no_grad():
            dense = self._pristine_dense().clone() if self.quantized else self.base.weight.detach().clone()
            columns = self.compose(live, merged, tuple(m.paca_delta.detach() for m in live))
            dense.index_copy_(1, self.index.to(dense.device), columns.to(dense.dtype))
        return dense

    def effective_weight(self) -> torch.Tensor:
        """The dense weight of the current placement (a dense base's own weight; a fresh copy for NF4)."""
        if not self.quantized:
            return self.base.weight
        dense = self.base.dequantize_weight()
        if self.columns is not None:
            dense.index_copy_(1, self.index, self.columns)
        return dense


def _same_values(placed: tuple[torch.Tensor, ...], live: list[PaCALayer]) -> bool:
    """Whether the placed copies still equal the live deltas, value for value."""
    if len(placed) != len(live):
        return False
    for value, layer in zip(placed, live):
        delta = layer.paca_delta
        if (value.shape != delta.shape or value.dtype != delta.dtype or value.device != delta.device
                or not torch.equal(value, delta)):
            return False
    return True


@contextlib.contextmanager
def _packed(module: nn.Module, packed: torch.Tensor):
    """Temporarily swap an NF4 module's packed buffer (to dequantize a saved copy)."""
    current = module.weight
    module.weight = packed
    try:
        yield
    finally:
        module.weight = current
