"""What each benchmark row runs: the floor, leantune methods by name, and Hugging Face PEFT's.

A row is a name on the command line. `floor` is the frozen model (forward plus input gradients
only) with torch's own products, as `transformers` runs it: no method is lighter, and with the
same products none is faster; leantune's rows compute theirs through oneDNN (`leantune/kernels.py`,
the worker's `make_step`). `peft-*` rows are Hugging Face PEFT under the same loss, data and
optimizer, with torch's products too. Every other name is a leantune method, built with
`leantune.methods.config_from_dict` from the preset below (or `{"name": row}` for any other
registered method); a preset whose method is not registered yet fails as a row error, not a crash.
"""
from __future__ import annotations

import copy
import difflib
import json
from typing import Any

from ..errors import LeantuneError

FLOOR = "floor"
PEFT_PREFIX = "peft-"
DEFAULT_METHODS = ("floor", "full", "lora", "dora", "ia3", "paca", "qlora", "qpaca", "sketchtune")

# Leantune rows. PaCA r=16 against LoRA r=8 pairs their trainable-parameter budgets (the PaCA
# paper's comparison); alpha = 2r keeps the same scaling s = alpha / r for both.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "r": 8, "alpha": 16},
    "lora-fa": {"name": "lora", "r": 8, "alpha": 16, "freeze_a": True},
    "dora": {"name": "dora", "r": 8, "alpha": 16},
    "ia3": {"name": "ia3"},
    "bitfit": {"name": "bitfit"},
    "paca": {"name": "paca", "r": 16, "alpha": 32},
    "qlora": {"name": "lora", "r": 8, "alpha": 16, "quantize": "nf4"},
    "qdora": {"name": "dora", "r": 8, "alpha": 16, "quantize": "nf4"},
    "qpaca": {"name": "paca", "r": 16, "alpha": 32, "quantize": "nf4"},
    # The sketch is fitted once per run (see `needs_preparation`); its quality does not change the
    # step's cost, so a small calibration set keeps that fit quick. `--set sketchtune.sketch=DIR`
    # benchmarks a sketch fitted beforehand with `leantune sketch`.
    "sketchtune": {"name": "sketchtune", "samples": 16, "seq_len": 256},
    # the MAM adapter (He et al.): prefix tuning plus a parallel adapter beside the feed-forward block
    "mam": {"name": "hybrid", "parts": [{"name": "prefix", "num_virtual_tokens": 20},
                                        {"name": "adapter", "placement": "parallel", "where": "ffn"}]},
    "prompt": {"name": "prompt", "num_virtual_tokens": 20},
    "prefix": {"name": "prefix", "num_virtual_tokens": 20},
    "adapter": {"name": "adapter"},  # Pfeiffer: serial, after the feed-forward block, bottleneck 64
    "houlsby": {"name": "adapter", "where": "both"},  # serial, after attention and after the feed-forward block
}

# Hugging Face PEFT rows: the same settings as the leantune row they are compared with.
# (IA)³ scales the key/value outputs and the input of the feed-forward down projection.
PEFT_PRESETS: dict[str, dict[str, Any]] = {
    "peft-lora": {"peft": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "peft-dora": {"peft": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "use_dora": True},
    "peft-ia3": {"peft": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                 "feedforward_modules": ["down_proj"]},
    # PEFT does LoRA-FA in its optimizer (peft.optimizers.create_lorafa_optimizer): it freezes A and
    # steps B with a projected AdamW, so this row's optimizer is that one, not the plain AdamW.
    "peft-lora-fa": {"peft": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "optimizer": "lorafa"},
    # PEFT prepends the virtual tokens only for a causal-LM task type
    "peft-prompt": {"peft": "prompt", "num_virtual_tokens": 20, "task_type": "CAUSAL_LM"},
    "peft-prefix": {"peft": "prefix", "num_virtual_tokens": 20, "task_type": "CAUSAL_LM"},
}
# What --peft always appends; another PEFT row comes along with its leantune row (peft-lora-fa,
# and peft-prompt / peft-prefix, which run under the full-logits loss only).
PEFT_ROWS = ("peft-lora", "peft-dora", "peft-ia3")

# Each leantune row and the PEFT row that does the same thing.
PEFT_COUNTERPART = {"lora": "peft-lora", "dora": "peft-dora", "ia3": "peft-ia3", "lora-fa": "peft-lora-fa",
                    "prompt": "peft-prompt", "prefix": "peft-prefix"}


def known_rows() -> list[str]:
    from ..methods import METHODS  # loads torch: `leantune bench --help` imports this module

    return sorted({FLOOR, *PRESETS, *PEFT_PRESETS, *METHODS})


def parse_row_names(text: str, with_peft: bool) -> list[str]:
    """The comma-separated row names, validated, in order, without duplicates; `--peft` appends PEFT's rows
    (PEFT_ROWS and the counterparts of the listed rows)."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise LeantuneError("--methods lists no method")
    known = known_rows()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LeantuneError(f"unknown benchmark method '{name}'{hint}; known: {', '.join(known)}")
    if with_peft:
        names += [*PEFT_ROWS, *(PEFT_COUNTERPART[name] for name in names if name in PEFT_COUNTERPART)]
    return list(dict.fromkeys(names))


def row_kind(name: str) -> str:
    if name == FLOOR:
        return "floor"
    return "peft" if name.startswith(PEFT_PREFIX) else "leantune"


def row_settings(name: str, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The method settings of row `name` (None for the floor), with `--set` overrides applied."""
    kind = row_kind(name)
    if kind == "floor":
        return None
    presets = PEFT_PRESETS if kind == "peft" else PRESETS
    settings = copy.deepcopy(presets.get(name, {"name": name}))
    settings.update((overrides or {}).get(name, {}))
    return settings


def parse_overrides(items: list[str] | None, rows: list[str]) -> dict[str, dict[str, Any]]:
    """`--set ROW.KEY=VALUE` items -> {row: {key: value}}; values are JSON when they parse, else strings."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items or []:
        target, sep, raw = item.partition("=")
        row, dot, key = target.partition(".")
        if not sep or not dot or not row or not key:
            raise LeantuneError(f"--set '{item}' must look like ROW.KEY=VALUE, e.g. paca.r=32")
        if row not in rows:
            raise LeantuneError(f"--set '{item}' names row '{row}', which is not among the benchmarked rows: {', '.join(rows)}")
        if row == FLOOR:
            raise LeantuneError(f"--set '{item}': the floor has no method settings")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(row, {})[key] = value
    _check_leantune_settings(overrides)
    return overrides


def _check_leantune_settings(overrides: dict[str, dict[str, Any]]) -> None:
    """A bad `--set` value fails here, naming the row, rather than as one error per worker process."""
    from ..methods import config_from_dict  # loads torch: `leantune bench --help` imports this module

    for row in overrides:
        if row_kind(row) != "leantune":
            continue
        try:
            config_from_dict(row_settings(row, overrides))
        except (LeantuneError, TypeError) as err:  # TypeError: a value the method's dataclass cannot take
            raise LeantuneError(f"--set for row '{row}': {err}") from None


def needs_preparation(settings: dict[str, Any] | None) -> bool:
    """SketchTune without a fitted sketch would refit it in every process: fit it once up front."""
    return bool(settings) and settings.get("name") == "sketchtune" and not settings.get("sketch")
