"""Acceptance targets judged on a benchmark's rows. The targets themselves are the project's, kept in
a JSON file (benchmarks/targets.json in the repository); the report lists whether each one is met.

A target is `{"row", "against", "metric", "op", "bound"}`:
- `against` a row name: the row's ratio to that row under the same loss (`metric` is a key of
  the row's ratios: step_time, peak_memory, saved_bytes, saved_above_floor, max_seq_len);
- `against` "full-logits loss": the row's chunked-loss figure over its full-logits one;
- no `against`: the row's own `base_bytes_vs_fp32` (stored over float32 base-weight bytes).
`row` "*" judges every row; `op` is one of <=, >=, <, >.
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

from ..errors import LeantuneError
from ..files import read_json_file

EVERY_ROW = "*"
FULL_LOSS = "full-logits loss"
OWN_METRICS = ("base_bytes_vs_fp32",)
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def read_targets(path: str | Path) -> list[dict[str, Any]]:
    """The targets in a JSON file `{"targets": [...]}`; any malformed entry is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise LeantuneError(f"targets file '{path}' does not exist")
    document = read_json_file(path)
    targets = document.get("targets") if isinstance(document, dict) else None
    if not isinstance(targets, list):
        raise LeantuneError(f"{path}: expected an object with a list under 'targets'")
    for index, target in enumerate(targets):
        problem = _problem(target)
        if problem:
            raise LeantuneError(f"{path}, target {index}: {problem}")
    return targets


def _problem(target: Any) -> str | None:
    if not isinstance(target, dict):
        return "expected an object"
    missing = [key for key in ("row", "metric", "op", "bound") if key not in target]
    if missing:
        return f"missing {', '.join(missing)}"
    if target["op"] not in OPS:
        return f"op {target['op']!r} is not one of {', '.join(OPS)}"
    if not isinstance(target["bound"], (int, float)) or isinstance(target["bound"], bool):
        return f"bound {target['bound']!r} is not a number"
    if target.get("against") is None and target["metric"] not in OWN_METRICS:
        return f"metric {target['metric']!r} needs 'against' (a row's own metrics: {', '.join(OWN_METRICS)})"
    return None


def target_rows(rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> list[list[str]]:
    """A table line per target and measured row it applies to: target, loss, measured value, met.
    Targets of one row come in the order of the rows, targets of every row after them."""
    measured = [entry for entry in rows if not entry.get("error")]
    named = [t for t in targets if t["row"] != EVERY_ROW]
    every = [t for t in targets if t["row"] == EVERY_ROW]
    pairs = [(entry, t) for entry in measured for t in named if t["row"] == entry["row"]]
    pairs += [(entry, t) for t in every for entry in measured]
    return [_line(entry, t, value) for entry, t in pairs if (value := _value(entry, t)) is not None]


def _value(entry: dict[str, Any], target: dict[str, Any]) -> float | None:
    against, metric = target.get("against"), target["metric"]
    if against == FULL_LOSS:
        return (entry.get("chunked_vs_full") or {}).get(metric)
    if against is not None:
        return entry["ratios"].get(against, {}).get(metric)
    base = entry.get("adapted_base_bytes") or {}
    return base["stored"] / base["fp32"] if base.get("fp32") else None


def _line(entry: dict[str, Any], target: dict[str, Any], value: float) -> list[str]:
    against, op, bound = target.get("against"), target["op"], target["bound"]
    words = f"{entry['row']} {target['metric'].replace('_', ' ')}"
    if against == FULL_LOSS:
        scale = "" if bound == 1 else f"{bound} × "
        label, loss = f"{words}, chunked loss {op} {scale}{FULL_LOSS}", "both"
    else:
        label, loss = f"{words}{f' × {against}' if against else ''} {op} {bound}", entry["loss"]
    return [label, loss, f"{value:.3f}", "yes" if OPS[op](value, bound) else "**no**"]
