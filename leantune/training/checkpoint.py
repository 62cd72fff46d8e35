"""Checkpoints: adapter, optimizer, scheduler, RNG states and data position, as safetensors + JSON.

Layout of `out_dir/checkpoints/`:

    step-N/adapter/            the adapter (leantune.adapters.save_adapter)
    step-N/optimizer.safetensors   every tensor of the optimizer state, keyed "<param index>.<name>"
    step-N/optimizer.json          param groups (hyper-parameters, parameter names) and non-tensor state
    step-N/rng.safetensors         torch CPU (and CUDA) generator states
    step-N/trainer_state.json      step, data position, scheduler, Python/NumPy RNG, counters, scaler
    latest                     the name of the newest complete checkpoint

Each step directory is written to a temporary sibling and renamed into place, then `latest` is
replaced atomically, so a kill at any moment leaves the previous checkpoint usable. No pickle.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import api
from ..errors import LeantuneError
from ..adapters import save_adapter
from ..adapters.native import (TRAINING_STATE_FILE, adapter_tensors, load_to_train, read_adapter_config,
                               training_tensors)
from ..files import atomic_directory, atomic_write_text, load_tensors, save_tensors

CHECKPOINTS = "checkpoints"
LATEST = "latest"
FORMAT_VERSION = 1


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step-{step}"


# -- optimizer state <-> tensors + JSON ------------------------------------------------------

def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into safetensors-ready tensors and a JSON-ready rest."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                plain_state.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain_state}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = tensor
    for index, values in document.get("plain_state", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": document["param_groups"]}


# -- RNG states --------------------------------------------------------------------------------

def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    document = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, document


def restore_rng(tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("torch_cuda_"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = document["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = document["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- save / load ------------------------------------------------------------------------------

def save_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep: int, saved_adapter: Path | None = None,
                    gather: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = dict,
                    writer: bool = True) -> Path:
    """Write `checkpoints/step-N` atomically, point `latest` at it, keep the newest `keep`.

    `saved_adapter`: the model's adapter as just saved elsewhere (the run's final adapter), linked
    into the checkpoint rather than written a second time. Under torchrun every process calls this:
    `gather` makes sharded tensors whole (a collective), and only the `writer` writes."""
    root = checkpoint_root(out_dir)
    step = int(trainer_state["step"])
    target = root / step_dir_name(step)
    adapter_state = None if saved_adapter is not None else gather(adapter_tensors(model))
    training_state = gather(training_tensors(model))  # the unfolded form of a folded adapter, if any
    opt_tensors, opt_document = flatten_optimizer(optimizer)
    opt_tensors = gather(opt_tensors)
    if not writer:
        return target
    rng_tensors, rng_document = capture_rng()
    with atomic_directory(target) as tmp:
        if saved_adapter is None:
            save_adapter(model, tmp / "adapter", tensors=adapter_state)
        else:
            _link_tree(saved_adapter, tmp / "adapter")
        if training_state:
            save_tensors(training_state, tmp / TRAINING_STATE_FILE)
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_document))
        save_tensors(rng_tensors, tmp / "rng.safetensors")
        document = {"format_version": FORMAT_VERSION, **trainer_state, "rng": rng_document}
        (tmp / "trainer_state.json").write_text(json.dumps(document, indent=1))
    atomic_write_text(root / LATEST, target.name + "\n")
    prune_checkpoints(root, keep)
    return target


def _link_tree(source: Path, target: Path) -> None:
    """Hard links where the file system allows them (no second copy on disk), else copies."""
    target.mkdir()
    for file in source.iterdir():
        try:
            os.link(file, target / file.name)
        except OSError:
            shutil.copy2(file, target / file.name)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` step directories (never the one `latest` names)."""
    remove_stale_temporaries(root)
    latest = read_latest_name(root)
    steps = sorted(step_dirs(root), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-keep] if keep > 0 else steps:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(root: Path) -> None:
    """Half-written checkpoints and pointers of a killed run (hidden `.step-N.tmp-*`, `.latest.tmp-*`)."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith((".step-", f".{LATEST}.")) and (".tmp-" in path.name or ".old-" in path.name):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]


def read_latest_name(root: Path) -> str | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    return pointer.read_text().strip() or None


def finished_run(out_dir: Path, total_steps: int) -> dict[str, Any] | None:
    """--resume of a run that finished: its summary when it reached `total_steps` (nothing to do);
    refused when it finished short of them and kept no checkpoint to continue from (save_every: 0),
    where starting over would replace its adapter without a word."""
    summary = out_dir / "summary.json"
    if not summary.is_file():
        return None
    done = json.loads(summary.read_text())
    if done.get("steps", -1) >= total_steps:
        return {**done, "step": done["steps"], "finished": True}
    if latest_checkpoint(out_dir) is None:
        raise LeantuneError(f"--resume: the run in '{out_dir}' finished at step {done.get('steps')} and kept no "
                            "checkpoint to continue from (save_every: 0); train it anew with --overwrite, or into "
                            "another out_dir")
    return None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint `latest` names; a dangling pointer falls back to the newest complete step directory."""
    root = checkpoint_root(out_dir)
    name = read_latest_name(root)
    if name and (root / name / "trainer_state.json").is_file():
        return root / name
    complete = [p for p in step_dirs(root) if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[1])) if complete else None


def load_checkpoint_adapter(path: Path, model: nn.Module) -> None:
    """Load a checkpoint's adapter tensors into the live model (before any sharding); where the
    adapter is saved folded, the tensors being trained, from the checkpoint's training state."""
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    _load_adapter_tensors(path / "adapter", model, path / TRAINING_STATE_FILE)
    if trainable != [id(p) for p in model.parameters() if p.requires_grad]:
        raise LeantuneError(f"checkpoint '{path}' cannot resume this run: its adapter was saved in folded form (prefix "
                            "tuning with reparam_hidden) without its training state (written before that was kept), "
                            "so loading it replaced the tensors being trained; start a new run from its adapter instead")


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer,
                    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Load the optimizer state (after `load_checkpoint_adapter`), restore RNG; return the trainer state.

    `place(full, param)` lays a saved full tensor out like its (possibly sharded) parameter."""
    try:
        document = json.loads((path / "trainer_state.json").read_text())
        opt_document = json.loads((path / "optimizer.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LeantuneError(f"checkpoint '{path}' is damaged: {err}") from None
    found = document.get("format_version", 0)
    if isinstance(found, bool) or not isinstance(found, int):
        raise LeantuneError(f"checkpoint '{path}' is damaged: trainer_state.json has format_version {found!r}, "
                            "which must be an integer")
    if found > FORMAT_VERSION:
        raise LeantuneError(f"checkpoint '{path}' was written by a newer leantune")
    saved_names = [g.get("names") for g in opt_document["param_groups"]]
    live_names = [g.get("names") for g in optimizer.param_groups]
    if saved_names != live_names:
        raise LeantuneError(f"checkpoint '{path}' was written for other trainable parameters than this config creates")
    state = unflatten_optimizer(load_tensors(path / "optimizer.safetensors"), opt_document)
    if place is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state["state"] = {index: {key: place(value, params[index]) if isinstance(value, torch.Tensor) else value
                                  for key, value in values.items()} for index, values in state["state"].items()}
    optimizer.load_state_dict(state)
    restore_rng(load_tensors(path / "rng.safetensors"), document.pop("rng"))
    return document


def _load_adapter_tensors(adapter_dir: Path, model: nn.Module, training_state: Path) -> None:
    saved = read_adapter_config(adapter_dir)
    registry = api.attached(model)
    name = saved.get("adapter_name", "default")
    if name not in registry or registry[name].to_dict() != saved["method"]:
        raise LeantuneError(f"checkpoint adapter in '{adapter_dir}' was saved for another method configuration")
    load_to_train(model, name, adapter_dir, training_state)
