"""Where and how a run computes, and which of its processes writes: the run environment.

The loop asks this module for its device, autocast, seed and thread settings and whether it is the
process that writes files, prints and handles Ctrl-C; it never decides those itself. Under torchrun
the process's rank, its device (cuda:LOCAL_RANK) and its share of the work (`distributed.Parallel`)
are settled here too.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import LeantuneError
from ..fused_ops import fuse_norms_and_mlps, unfuse
from ..loss import check_packed_rows_stay_apart, plain_output_head
from .distributed import Parallel, launched_world


@dataclass
class RunEnvironment:
    device: torch.device
    precision: str  # fp32, bf16 or fp16 (autocast)
    threads: int | None = None  # CPU threads for torch; None: torch's default
    parallel: Parallel = field(default_factory=lambda: Parallel("none"))

    @classmethod
    def from_config(cls, config: Any) -> "RunEnvironment":
        device = resolve_device(config.device)
        _, world_size, local_rank = launched_world()
        if device.type == "cuda" and world_size > 1:  # one GPU per process
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        check_precision(config.precision, device)
        parallel = Parallel.join(config.distributed, device, config.distributed_timeout_s)
        return cls(device, config.precision, config.threads, parallel)

    @property
    def rank(self) -> int:
        return self.parallel.rank

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    @property
    def is_writer(self) -> bool:
        """The one process that writes files and prints (rank 0)."""
        return self.rank == 0

    def autocast(self) -> Any:
        return autocast(self.precision, self.device)

    def seed(self, seed: int) -> None:
        seed_everything(seed)

    def seed_step(self, seed: int, step: int) -> None:
        """Under torchrun each step's random draws (dropout) are a function of (seed, step, rank):
        processes draw different masks, and a resumed run draws what the uninterrupted one did,
        whatever each process's generator went through before."""
        if self.parallel.active:
            torch.manual_seed((seed * 1_000_003 + step) * 65_537 + self.rank)

    @contextlib.contextmanager
    def cpu_threads(self) -> Iterator[None]:
        """torch's thread count for the run; a Python caller's process keeps its own setting afterwards."""
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def install_sigint(self, handler: Callable[[int, Any], None]) -> Any:
        """Ctrl-C goes to `handler` in a plain run's main thread; returns the previous handler. Under
        torchrun, Ctrl-C reaches torchrun, which stops every process: the last checkpoint is kept."""
        if self.parallel.active or threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGINT, handler)

    @staticmethod
    def restore_sigint(previous: Any) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LeantuneError("config key 'device' is cuda, but no CUDA device is available")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp32":
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise LeantuneError("config key 'precision' is bf16, but this GPU does not support bfloat16")
    try:
        with torch.autocast(device.type, dtype=dtype):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except (RuntimeError, AssertionError) as err:
        raise LeantuneError(f"config key 'precision' is {precision}, which {device.type} autocast does not support: "
                            f"{str(err).splitlines()[0]}") from None


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def apply_model_options(model: torch.nn.Module, config: Any) -> None:
    """The config's options that change how the model computes, not what: recomputation, the fused
    norms and MLPs, and compiling (last: a compiled block traces the fused forwards). First, on the
    model as it is, the checks that run a forward: packing is refused where packed examples would
    see each other, and whether the chunked loss may use the output head is settled before compiling
    (a later eval-mode check would compile the blocks once more)."""
    if config.packing:
        check_packed_rows_stay_apart(model)
    if config.chunked_loss is not False:
        plain_output_head(model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.fused_ops:
        fuse_norms_and_mlps(model)
    if config.compile:  # config validation refuses it with distributed
        compile_decoder_blocks(model)


def compile_seconds() -> float:
    """Seconds PyTorch has spent compiling in this process so far: graphs (forward and joint) and the
    backward graphs it compiles lazily at their first backward."""
    from torch._dynamo.utils import compilation_time_metrics  # PyTorch's own record of its compile calls
    return sum(sum(compilation_time_metrics.get(key, [])) for key in _COMPILE_METRICS)


_COMPILE_METRICS = ("_compile.compile_inner", "backward._backward_impl")


def compile_clock(state: dict[str, Any], enabled: bool) -> Callable[[], None]:
    """A tick that keeps state["compile_s"]: the seconds compiled since this call (while the steps
    run), on top of what a resumed run carried in."""
    if not enabled:
        return lambda: None
    start, carried = compile_seconds(), state.get("compile_s", 0.0)

    def tick() -> None:
        state["compile_s"] = carried + compile_seconds() - start
    return tick


def compile_summary(config: Any, state: dict[str, Any]) -> dict[str, float]:
    """`compile_s` for the summary of a `compile: true` run (already inside its time_s)."""
    return {"compile_s": round(state.get("compile_s", 0.0), 3)} if config.compile else {}


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing: frozen inputs (the usual PEFT case) still get adapter gradients."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise LeantuneError("config key 'gradient_checkpointing': this model does not support it")


def compile_decoder_blocks(model: torch.nn.Module) -> int:
    """`torch.compile` each decoder block, as torchtune does; return how many were compiled.

    Blocks of one shape share one compiled graph (PyTorch inlines module parameters as inputs), so
    the compile cost is paid once, not per layer. Adapter layers run eagerly inside it (see
    `AdapterLayer.forward`): the compiled code is the glue between the projections, i.e. the norms,
    rotary embeddings, attention and activations."""
    blocks = _decoder_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)


def without_model_options(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every block eager again (generation after training changes shape every step)
    and every module on its own forward: what follows training gets the model it was given."""
    for module in model.modules():
        module.__dict__.pop("_compiled_call_impl", None)  # what nn.Module.compile sets
    unfuse(model)
    return model


def _decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    config = getattr(model, "config", None)
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config(decoder=True)  # multimodal models keep the decoder's apart
    layers = getattr(config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return module
    raise LeantuneError("config key 'compile': found no list of decoder blocks in this model to compile")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def say_from_signal_handler(message: str) -> None:
    """Write to stderr's file descriptor directly: a handler that printed through sys.stderr could
    re-enter a write the interrupted code was in the middle of (a RuntimeError)."""
    try:
        os.write(sys.stderr.fileno(), message.encode())
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor, e.g. captured in tests
        sys.stderr.write(message)
