"""The config keys explained: every key with its default and meaning, and the resume rule, for
`leantune train --help` (light: no torch)."""
from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

import yaml

from .config import RESUMABLE_KEYS, DataConfig, TrainConfig


def documented_keys() -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every config key, in declaration order."""
    rows = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "data":
            for sub in dataclasses.fields(DataConfig):
                rows.append((f"data.{sub.name}", sub.default, sub.metadata["doc"]))
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append((f.name, default, f.metadata["doc"]))
    return rows


def format_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def keys_help() -> str:
    """Every key with its default and meaning, for `leantune train --help`."""
    rows = documented_keys()
    width = max(len(key) + len(format_value(default)) for key, default, _ in rows) + 3
    lines = ["config keys (default) — set in CONFIG.yaml or with --set key=value:"]
    for key, default, doc in rows:
        lines.append(f"  {key} = {format_value(default)}".ljust(width + 4) + f" {doc}")
    return "\n".join(lines) + "\n\n" + resume_rule()


def resume_rule() -> str:
    """What --resume may change, for `leantune train --help`."""
    text = (f"--resume may change only {', '.join(RESUMABLE_KEYS)} from the run's out_dir/config.yaml: they "
            "decide how long the run goes on, what it reports or saves, over how many processes and whether blocks "
            "are compiled, not what it "
            "computes (a new "
            "max_steps or epochs stretches the learning-rate schedule to the new total). A change to any other "
            "key is refused, since the checkpoint would then continue a different run; for that, start a new "
            "run with another out_dir or with --overwrite.")
    return textwrap.fill(text, width=100)
