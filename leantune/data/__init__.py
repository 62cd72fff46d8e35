"""Datasets: JSONL prompt/completion and chat formats, plain text, and the built-in HumanEval unit-test pairs."""
from __future__ import annotations

from typing import Any

from ..errors import LeantuneError
from ..loss import IGNORE_INDEX
from .batching import BatchStream, FitReport, collate, fit_to_length, pack
from .formats import Example, builtin_names, builtin_records, is_builtin, load_examples

__all__ = [
    "BatchStream", "FitReport", "collate", "fit_to_length", "pack", "IGNORE_INDEX", "Example",
    "builtin_names", "builtin_records", "is_builtin", "load_examples", "prepare_dataset",
]


def prepare_dataset(source: str, tokenizer: Any, max_length: int, overlong: str = "truncate",
                    packing: bool = False) -> tuple[list[Example], FitReport]:
    """Tokenize `source`, fit every example to `max_length`, optionally pack; error if nothing is left."""
    loaded = load_examples(source, tokenizer, max_length)
    examples, report = fit_to_length(loaded, max_length, overlong)
    if not examples:
        raise LeantuneError(f"data source '{source}': no example is left after fitting to max_length={max_length} "
                            f"({report.dropped} dropped); {_what_would_fit(loaded, max_length, overlong)}")
    if packing:
        examples = pack(examples, max_length)
    return examples, report


def _what_would_fit(examples: list[Example], max_length: int, overlong: str) -> str:
    """The advice for a source with nothing left: suggest truncation only when it would keep something."""
    if overlong == "drop" and fit_to_length(examples, max_length, "truncate")[1].kept:
        return "raise max_length or use overlong: truncate"
    if not fit_to_length(examples, max(map(len, examples), default=1), overlong)[1].kept:
        return "no example has a token to learn from at any length (empty completions or assistant turns?)"
    return "raise max_length (cut to max_length, no example keeps a token to learn from)"
