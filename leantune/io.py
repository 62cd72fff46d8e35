"""Adapter save/load (safetensors + JSON, never pickle) and atomic writes.

An adapter directory holds `adapter_config.json` (method, its fields, adapter name, base model)
and `adapter.safetensors`. Directories and files are written to a temporary sibling first and
renamed into place, so an interrupted save never damages what was there before.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import api
from .errors import LeantuneError
from .methods.base import MethodConfig, config_from_dict

CONFIG_FILE = "adapter_config.json"
TENSOR_FILE = "adapter.safetensors"
FORMAT = "leantune-adapter"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LeantuneError(f"cannot write directory '{path}': a file with that name exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        _finish_tree(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish_tree(root: Path) -> None:
    """Flush every file to disk and give it the permissions the umask asks for (writers such as
    safetensors create private files)."""
    mode = 0o666 & ~_current_umask()
    for file in root.rglob("*"):
        if file.is_file():
            os.chmod(file, mode)
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write(path, text, "w")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(path, data, "wb")


def _atomic_write(path: str | os.PathLike, content: str | bytes, mode: str) -> None:
    """Write to a temporary sibling, then rename it over `path`: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes it private; the result should not be
        with os.fdopen(fd, mode) as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors needs contiguous, unshared CPU tensors; copy what is not."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(plain, str(path), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise LeantuneError(f"cannot read tensors from '{path}': {err}") from None


def _single_adapter_name(model: nn.Module, adapter_name: str | None) -> str:
    names = list(api.attached(model))
    if adapter_name is not None:
        if adapter_name not in names:
            raise LeantuneError(f"no adapter named '{adapter_name}' is attached (attached: {', '.join(names) or 'none'})")
        return adapter_name
    if len(names) != 1:
        raise LeantuneError(f"the model has {len(names)} adapters ({', '.join(names) or 'none'}); pass adapter_name=")
    return names[0]


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write one adapter (config JSON + safetensors) atomically to directory `path`."""
    name = _single_adapter_name(model, adapter_name)
    config = api.attached(model)[name]
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_name": name,
        "method": config.to_dict(),
        "base_model": getattr(getattr(model, "config", None), "_name_or_path", None),
        **(extra or {}),
    }
    with atomic_directory(path) as tmp:
        save_tensors(config.state_dict(model, name), tmp / TENSOR_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    return Path(path)


def read_json_file(path: Path) -> Any:
    """The JSON in `path`; invalid JSON or text is an error naming the file."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LeantuneError(f"'{path}' is not valid JSON: {err}") from None


def read_format_document(path: str | os.PathLike, file_name: str, fmt: str, version: int, kind: str) -> dict[str, Any]:
    """The JSON document `file_name` of a leantune `kind` directory (adapter, sketch), format-checked."""
    path = Path(path)
    config_path = path / file_name
    if not path.is_dir():
        raise LeantuneError(f"{kind} directory '{path}' does not exist")
    if not config_path.is_file():
        raise LeantuneError(f"'{path}' is not a leantune {kind}: {file_name} is missing")
    document = read_json_file(config_path)
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise LeantuneError(f"'{config_path}' is not a leantune {kind} config (format != '{fmt}')")
    if document.get("format_version", 0) > version:
        raise LeantuneError(f"'{config_path}' was written by a newer leantune (format {document['format_version']})")
    return document


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    return read_format_document(path, CONFIG_FILE, FORMAT, FORMAT_VERSION, "adapter")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Attach the adapter saved in `path` to `model` (a fresh base model) and load its tensors."""
    document = read_adapter_config(path)
    config: MethodConfig = config_from_dict(document["method"])
    name = adapter_name or document.get("adapter_name", "default")
    tensors = load_tensors(Path(path) / TENSOR_FILE)
    return attach_with_state(model, config, name, tensors)


def save_merged_model(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None,
                      in_place: bool = False) -> Path:
    """Fold every adapter into its base and write a plain Hugging Face model folder (atomically).

    NF4 and sketched bases become dense first (their rounded values), so the merge adds each
    update in full precision instead of rounding it back into 4 bits. The model is left as it was
    (the merge runs on a copy) unless in_place=True, which saves that copy's memory and leaves the
    model detached with the merged weights, like PEFT's merge_and_unload.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise LeantuneError(f"a merged export needs a Hugging Face model (with save_pretrained), got {type(model).__name__}")
    if not in_place:
        model = copy.deepcopy(model)
    _dequantize_bases(model)
    if api.attached(model):
        api.detach(model, keep_merged=True)
    _check_architecture_holds(model)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def _check_architecture_holds(model: nn.Module) -> None:
    """The merged tensors must be what the model's own config builds (e.g. no biases it lacks)."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    extra = sorted(set(model.state_dict()) - set(fresh.state_dict()))
    if extra:
        raise LeantuneError(f"the merged model holds '{extra[0]}', which the {type(model).__name__} config does not "
                            "build (e.g. biases added by bitfit add_bias=True); export the adapter instead")


def _dequantize_bases(model: nn.Module) -> None:
    """Swap NF4 bases for dense linears under every adapter, re-attaching the adapters exactly."""
    from .quant import is_quantized
    from .targets import replace_module

    if not any(is_quantized(module) for module in model.modules()):
        return
    saved = [(name, config, config.state_dict(model, name)) for name, config in api.attached(model).items()]
    if saved:
        api.detach(model)  # exact: every base back to what attach found (NF4 stays NF4)
    for name, module in list(model.named_modules()):
        if is_quantized(module):
            replace_module(model, name, module.to_dense())
    for name, config, state in saved:
        attach_with_state(model, dataclasses.replace(config, quantize=None) if hasattr(config, "quantize") else config,
                          name, state)


def attach_with_state(model: nn.Module, config: MethodConfig, adapter_name: str,
                      state: dict[str, torch.Tensor]) -> nn.Module:
    """Attach `config` and load its tensors; a tensor that does not fit leaves the model as it was."""
    api.attach(model, config, adapter_name)
    try:
        config.load_state_dict(model, adapter_name, state)
    except LeantuneError:
        api.detach(model, adapter_name)
        raise
    return model
