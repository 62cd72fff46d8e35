"""The names of the built-in datasets. Nothing here imports torch, so command help texts and config
defaults can name them without slowing `leantune --help`."""
from __future__ import annotations

HUMANEVAL_TESTS = "humaneval-tests"  # HumanEval functions paired with unit tests (leantune.data.humaneval)
HUMANEVAL_TESTS_SPLITS = ("train", "test", "all")
