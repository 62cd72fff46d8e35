"""The measurements one worker takes: bytes saved for backward, resident memory, step timers.

Bytes saved for backward count every tensor autograd keeps between forward and backward (unique
storages, via `saved_tensors_hooks`), except the model's own parameters and buffers. Unlike a
peak-memory reading it does not depend on the allocator or on the machine's other load.
"""
from __future__ import annotations

import contextlib
import resource
import time
from typing import Callable, Iterator

import torch
from torch import nn


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the storage under `tensor`; views of one storage share it."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return id(tensor), tensor.numel() * tensor.element_size()


def model_storages(model: nn.Module) -> set[int]:
    """Storage addresses of every parameter and buffer (frozen weights are not activation memory)."""
    return {_storage_key(t)[0] for t in (*model.parameters(), *model.buffers())}


@contextlib.contextmanager
def saved_for_backward(excluded: set[int]) -> Iterator[dict[int, int]]:
    """Inside the block, record storage address -> bytes of every tensor autograd saves."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        address, nbytes = _storage_key(tensor)
        if address not in excluded:
            seen[address] = nbytes
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield seen


# -- resident memory (CPU) -------------------------------------------------------------------

def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def process_peak_rss() -> int:
    """Peak resident set of this process since it started (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark (VmHWM) at the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def touch_parameters(model: nn.Module) -> None:
    """Fault in every weight page (loaded weights may be memory-mapped and only partly resident),
    so the RSS read after loading is the model's real footprint, not an accident of page faults."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.numel() and tensor.device.type == "cpu" and tensor.dtype.is_floating_point:
                tensor.sum()


# -- timing --------------------------------------------------------------------------------

def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of `step` takes: CUDA events on a GPU, a monotonic clock on CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end) / 1000.0
    start = time.perf_counter()
    step()
    return time.perf_counter() - start
