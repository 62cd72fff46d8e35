"""A run's directory: where it goes, whether it may be written, and what a resume may change.

`out_dir` holds config.yaml, metrics.jsonl, checkpoints/, adapter/ and summary.json. A resume
continues the run in it only with the same run-identity keys (config.RESUMABLE_KEYS may change);
everything is checked before anything is written.
"""
from __future__ import annotations

import hashlib
import shlex
import shutil
from array import array
from pathlib import Path
from typing import Any

from ..data import Example
from ..errors import LeantuneError
from ..files import file_above
from ..methods import config_from_dict
from .config import (MAPPING_KEYS, RESUMABLE_KEYS, RUN_LENGTH_KEYS, TIME_PLACEHOLDER, TrainConfig, expand_out_dir,
                     load_yaml, resolved_dict)
from .keys import format_value

# Files a run writes directly in out_dir; --overwrite removes exactly these.
RUN_ARTIFACTS = ("checkpoints", "adapter", "config.yaml", "metrics.jsonl", "summary.json", "tensorboard",
                 "unit_tests.json")


def resolve_out_dir(pattern: str, resume: bool) -> Path:
    """Expand {time}; when resuming, the newest existing directory that matches the pattern."""
    if TIME_PLACEHOLDER not in pattern:
        return Path(pattern).expanduser()
    if not resume:
        return Path(expand_out_dir(pattern)).expanduser()
    base = Path(pattern).expanduser()
    matches = sorted(base.parent.glob(base.name.replace(TIME_PLACEHOLDER, "*")))
    matches = [m for m in matches if m.is_dir()]
    if not matches:
        raise LeantuneError(f"--resume: no run directory matches out_dir '{pattern}'")
    return matches[-1]


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise LeantuneError(f"out_dir '{out_dir}' is a file")
    blocking = file_above(out_dir)
    if blocking is not None:
        raise LeantuneError(f"out_dir '{out_dir}' lies under '{blocking}', which is a file")
    if resume and overwrite:
        raise LeantuneError("--resume and --overwrite contradict each other; pass one of them")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (resume or overwrite):
        raise LeantuneError(f"out_dir '{out_dir}' is not empty; pass --resume to continue that run "
                            "or --overwrite to replace it")


def check_resume_identity(out_dir: Path, config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """Refuse a resume whose config changes more than RESUMABLE_KEYS; return the changes it may make."""
    saved_path = out_dir / "config.yaml"
    if not saved_path.is_file():
        return []
    differences = resume_differences(load_yaml(saved_path), config)
    refused = [change for change in differences if change[0].split(".")[0] not in RESUMABLE_KEYS]
    if refused:
        raise LeantuneError(resume_refusal(out_dir, refused))
    return differences


def resume_refusal(out_dir: Path, refused: list[tuple[str, Any, Any]]) -> str:
    alternative = ("start a new run with another out_dir or with --overwrite "
                   "(leantune train --help lists the keys a resume may change)")
    if len(refused) == 1:
        key, old, new = refused[0]
        return (f"--resume: config key '{key}' is {format_value(new)} but the run in '{out_dir}' used "
                f"{format_value(old)}; keep {format_value(old)} to resume that run, or {alternative}")
    changes = ", ".join(f"'{key}' ({format_value(new)}, the run used {format_value(old)})" for key, old, new in refused)
    return (f"--resume: config keys {changes} differ from the run in '{out_dir}'; keep the run's values "
            f"to resume it, or {alternative}")


def describe_resume_changes(changes: list[tuple[str, Any, Any]], total_steps: int) -> str:
    """The one line that announces what a resumed run changes."""
    listed = ", ".join(f"{key} {format_value(old)} -> {format_value(new)}" for key, old, new in changes)
    schedule = (f"; the learning-rate schedule now spans {total_steps} steps"
                if any(key in RUN_LENGTH_KEYS for key, _, _ in changes) else "")
    return f"--resume with changed keys: {listed}{schedule}"


def examples_digest(examples: list[Example]) -> str:
    """A fingerprint of the tokenized training examples, kept in every checkpoint: a resume counts its
    position in examples, so it must find the same ones (a rewritten data file, another tokenizer)."""
    digest = hashlib.sha256()
    for example in examples:
        for values in (example.input_ids, example.labels, example.position_ids or ()):
            digest.update(array("q", values).tobytes())
            digest.update(b"|")
    return digest.hexdigest()


def check_same_data(state: dict[str, Any], digest: str, out_dir: Path) -> dict[str, Any]:
    """The checkpoint's state, refused if it trained on other examples; its later checkpoints carry the digest."""
    saved = state.get("data_digest")  # checkpoints written before the fingerprint have none
    if saved is not None and saved != digest:
        raise LeantuneError(f"--resume: the training examples differ from those the run in '{out_dir}' trained on "
                            "(the data file or the tokenizer changed), so its position would point into other "
                            "examples; resume with the same data, or start a new run with another out_dir or "
                            "--overwrite")
    return {**state, "data_digest": digest}


def remove_run_artifacts(out_dir: Path) -> None:
    """--overwrite: remove what an earlier run wrote (and nothing else a user keeps there)."""
    for name in RUN_ARTIFACTS:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def resume_command(out_dir: Path, command: list[str] | None) -> str:
    if command is None:
        return f"lt.train(config, resume=True) with out_dir set to {str(out_dir)!r}"
    return shlex.join([*command, "--set", f"out_dir={out_dir}", "--resume"])


def resume_differences(saved: dict[str, Any], config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in the run's config.yaml, value now) for each key that differs.

    Keys the saved file lacks (an older leantune) are not compared; method mappings are compared
    with their defaults filled in, so `{name: lora, r: 8}` equals `{name: lora, r: 8, alpha: 16}`.
    """
    differences = []
    for key, new in resolved_dict(config).items():
        if key == "out_dir" or key not in saved:
            continue
        old = saved[key]
        if key == "method":
            differences += _method_differences(old, new)
        elif key in MAPPING_KEYS:
            differences += _mapping_differences(key, old, new)
        elif old != new:
            differences.append((key, old, new))
    return differences


def _mapping_differences(prefix: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [(prefix, old, new)]
    keys = list(new) + [key for key in old if key not in new]
    return [(f"{prefix}.{key}", old.get(key), new.get(key)) for key in keys if old.get(key) != new.get(key)]


def _method_differences(old: Any, new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and old.get("name") != new.get("name"):
        return [("method.name", old.get("name"), new.get("name"))]
    return _mapping_differences("method", _with_defaults(old), _with_defaults(new))


def _with_defaults(method: Any) -> Any:
    try:
        return config_from_dict(method).to_dict()
    except (LeantuneError, TypeError):  # written by another leantune version: compare as written
        return method
