"""Files leantune writes and reads: atomic directories and text, safetensors, JSON documents.

A leaf: it imports nothing of leantune's but its errors. Directories and files are written to a
temporary sibling first and renamed into place, so an interrupted write never damages what was
there before; only safetensors and JSON are read, so nothing loaded can execute code.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LeantuneError


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error."""
    path = Path(path)
    check_output_path(path, directory=True)
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


def check_output_path(path: str | os.PathLike, directory: bool) -> None:
    """Refuse an output path that cannot be written: a file where a directory goes or the reverse, or a
    path under a file. Commands call it before their work, so a typo costs no training or generation."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise LeantuneError(f"cannot write directory '{path}': a file with that name exists")
    if not directory and path.is_dir():
        raise LeantuneError(f"cannot write file '{path}': it is a directory; name a file in it instead")
    blocker = file_above(path)
    if blocker is not None:
        raise LeantuneError(f"cannot write '{path}': '{blocker}' is a file, not a directory")


def file_above(path: Path) -> Path | None:
    """The first folder on the way to `path` that exists as a file (nothing can be written under it)."""
    return next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)


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
    check_output_path(path, directory=False)
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


def read_json_file(path: Path) -> Any:
    """The JSON in `path`; invalid JSON or text is an error naming the file."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LeantuneError(f"'{path}' is not valid JSON: {_json_error_text(err)}") from None
    except UnicodeDecodeError as err:
        raise LeantuneError(f"'{path}' is not UTF-8 text: {err}") from None


def _json_error_text(err: json.JSONDecodeError) -> str:
    """The parser's complaint and where, as one phrase: "expecting ',' delimiter at line 3, column 5"
    (some complaints, e.g. "Unterminated string starting at", end in the position they refer to)."""
    what = err.msg[:1].lower() + err.msg[1:]
    where = f"line {err.lineno}, column {err.colno}"
    return f"{what} {where}" if what.endswith(" at") else f"{what} at {where}"


def read_format_document(path: str | os.PathLike, file_name: str, fmt: str, version: int, kind: str) -> dict[str, Any]:
    """The JSON document `file_name` of a leantune `kind` directory (adapter, sketch), format-checked."""
    path = Path(path)
    config_path = path / file_name
    if path.exists() and not path.is_dir():
        raise LeantuneError(f"{kind} '{path}' is a file, not a directory; pass the {kind} directory")
    if not path.is_dir():
        raise LeantuneError(f"{kind} directory '{path}' does not exist")
    if not config_path.is_file():
        raise LeantuneError(f"'{path}' is not a leantune {kind}: {file_name} is missing")
    document = read_json_file(config_path)
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise LeantuneError(f"'{config_path}' is not a leantune {kind} config (format != '{fmt}')")
    found = document.get("format_version", 0)
    if isinstance(found, bool) or not isinstance(found, int):
        raise LeantuneError(f"'{config_path}' has format_version {found!r}, which must be an integer (this leantune "
                            f"writes {version})")
    if found > version:
        raise LeantuneError(f"'{config_path}' was written by a newer leantune (format {found})")
    return document
