"""Training under `torchrun`: DDP or FSDP2 from torch.distributed, made exact for leantune's methods.

The one process of a plain run is world 1 and passes through untouched. Under torchrun:

- `batch_size` stays the global micro-batch: every process builds the same batch from the same
  stream and keeps its share of the rows, so a config trains the same adapter on 1 or N processes
  (up to float summation order) and a checkpoint resumes under any number of them.
- The loss runs inside the forward of one wrapper module, the unit DDP hooks and FSDP2 shards as
  its root: the chunked loss reads the output head's weight directly, and inside the root's forward
  that weight is the gathered one. It is scaled by the world size, because both engines average
  gradients over processes while the loss is a sum over the global batch's labelled tokens divided
  by their count.
- FSDP2 shards each decoder block, then the root. PaCA then adds X_I Δᵀ beside the base matmul
  instead of writing Δ into the (sharded) frozen weight; NF4 bases are refused.
- Saving gathers full tensors on every process and rank 0 alone writes them; loading places the
  full tensors back into each process's shard. Checkpoints stay safetensors + JSON (no pickle).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LeantuneError
from ..loss import IGNORE_INDEX

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    except (KeyError, ValueError):
        raise LeantuneError("the torchrun variables RANK / WORLD_SIZE / LOCAL_RANK are missing or not "
                            "integers; start distributed runs with torchrun or leantune train --nproc") from None


class _LossUnit(nn.Module):
    """Runs a computation on the model inside this module's forward, the one DDP and FSDP2 see."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, compute: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return compute(self.model, *args, **kwargs)


class Parallel:
    """How this process shares a run with the others: alone, DDP or FSDP2."""

    def __init__(self, mode: str, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 owns_group: bool = False):
        self.mode = mode if world_size > 1 else "none"
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.owns_group = owns_group  # this run started the process group (not a caller who runs several)
        self.unit: nn.Module | None = None  # the wrapped _LossUnit once `wrap` ran

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # -- the process group ----------------------------------------------------------------------
    @classmethod
    def join(cls, mode: str, device: torch.device, timeout_s: int) -> "Parallel":
        """Join torchrun's process group (gloo on CPU, NCCL on CUDA); a plain process stays alone."""
        rank, world_size, local_rank = launched_world()
        if world_size == 1:
            return cls("none")
        if mode == "none":
            raise LeantuneError(f"this process is one of {world_size} started by torchrun, but config key "
                                "'distributed' is none; set distributed: ddp or fsdp (--set distributed=ddp)")
        backend = "nccl" if device.type == "cuda" else "gloo"
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(mode, rank, world_size, device, owns_group)

    def close(self) -> None:
        """Leave the group together: a process that left alone would keep the others waiting at exit."""
        if self.active and dist.is_initialized():
            dist.barrier()
            if self.owns_group:
                dist.destroy_process_group()

    # -- wrapping -------------------------------------------------------------------------------
    def check_method(self, method: Any) -> None:
        """Refusals that must come before anything is loaded."""
        quantized = [getattr(part, "quantize", None) for part in getattr(method, "parts", [method])]
        if self.mode == "fsdp" and any(quantized):
            raise LeantuneError("distributed: fsdp with an NF4 base (method.quantize) is not supported yet: its "
                                "packed 4-bit weights cannot be sharded like float ones; use distributed: ddp")

    def wrap(self, model: nn.Module) -> None:
        """DDP around the loss unit, or FSDP2 over each decoder block and then the loss unit as root."""
        if not self.active:
            return
        unit = _LossUnit(model)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel  # only distributed runs need it

            ids = [self.device.index] if self.device.type == "cuda" else None
            # broadcast_buffers off: buffers (PaCA's column indices, NF4 codes) are equal on every process
            self.unit = DistributedDataParallel(unit, device_ids=ids, broadcast_buffers=False)
            return
        from torch.distributed.device_mesh import init_device_mesh  # only FSDP runs need these
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if hasattr(module, "keep_weight_unwritten"):
                module.keep_weight_unwritten()
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        self.unit = fully_shard(unit, mesh=mesh)

    def run(self, compute: Callable[..., Any], model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """`compute(model, ...)`, inside the wrapper's forward when there is one."""
        if self.unit is None:
            return compute(model, *args, **kwargs)
        return self.unit(compute, *args, **kwargs)

    @property
    def loss_scale(self) -> int:
        """Both engines average gradients over processes; the loss is a sum over all of them."""
        return self.world_size

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Micro-batches before the last of a step skip the gradient all-reduce / reduce-scatter."""
        if self.unit is None or enabled:
            yield
        elif self.mode == "ddp":
            with self.unit.no_sync():
                yield
        else:
            self.unit.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.unit.set_requires_gradient_sync(True)

    # -- data -----------------------------------------------------------------------------------
    def share(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This process's rows of the global micro-batch (trailing all-padding columns cut).

        A process left without rows (the short last batch of an epoch) runs the first row with every
        label masked: it joins the collectives and adds nothing to the loss or the gradients."""
        if not self.active:
            return batch
        rows = torch.tensor_split(torch.arange(batch["input_ids"].shape[0]), self.world_size)[self.rank]
        if rows.numel() == 0:
            share = {k: v[:1].clone() for k, v in batch.items()}
            share["labels"].fill_(IGNORE_INDEX)
            return share
        share = {k: v[rows] for k, v in batch.items()}
        width = int(share["attention_mask"].sum(0).nonzero().max()) + 1 if "attention_mask" in share else None
        return {k: v[:, :width] for k, v in share.items()} if width else share

    def sum(self, value: float) -> float:
        """`value` summed over the processes (a reported loss, a flag)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return float(tensor.item())

    def token_mean(self, loss_sum: float, tokens: int) -> float:
        """A loss per token over every process's share (each gives its sum and its token count)."""
        tokens = self.sum(tokens)
        if tokens == 0:
            raise LeantuneError("the eval set has no labelled tokens to evaluate")
        return self.sum(loss_sum) / tokens

    def gather_numbers(self, value: float) -> list[float]:
        """`value` from every process, in rank order."""
        tensor = torch.zeros(self.world_size, dtype=torch.float64, device=self._collective_device())
        tensor[self.rank] = value
        dist.all_reduce(tensor)
        return [int(v) if float(v).is_integer() else float(v) for v in tensor.tolist()]

    def _collective_device(self) -> torch.device:
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    # -- state ------------------------------------------------------------------------------------
    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every sharded tensor gathered whole (a collective: every process calls it, same order)."""
        if not self.active:
            return tensors
        return {key: full_tensor(value) for key, value in tensors.items()}

    def place(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A full tensor laid out as `like` is: this process's shard when `like` is sharded."""
        from torch.distributed.tensor import DTensor, distribute_tensor  # only sharded runs get here

        if not isinstance(like, DTensor) or tuple(full.shape) != tuple(like.shape):
            return full
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


def held_bytes(tensors: Any) -> int:
    """Bytes these tensors occupy in this process: a sharded tensor counts its local shard only."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def full_tensor(value: Any) -> Any:
    """A DTensor's whole value (a collective); any other value as it is."""
    gather = getattr(value, "full_tensor", None)
    return gather() if callable(gather) else value


def sharded_grad_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a number; over sharded gradients it is a DTensor to gather first."""
    return float(full_tensor(norm))
