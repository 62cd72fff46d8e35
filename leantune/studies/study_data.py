"""The study's data: training source, held-out functions, and the records a user's JSONL becomes.

`humaneval-tests` uses its fixed split (124 train, 40 held out). A user's JSONL of
`{"code", "test", "entry_point"}` records is turned into the same record shape as
`humaneval-tests` (the same instruction prompt ending in `def test_<entry_point>():`), checked (each
reference test must pass on its own code in the sandbox, else the record is dropped with its line
named), shuffled with `split_seed`, and cut into train and held-out parts written under
`OUT/data/` as `{"prompt", "completion"}` JSONL, which `leantune train` reads.
"""
from __future__ import annotations

import ast
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..builtin_datasets import HUMANEVAL_TESTS
from ..data import builtin_records
from ..data.formats import existing_file, read_jsonl
from ..data.humaneval import model_prompt, unit_test_header
from ..errors import LeantuneError
from ..files import atomic_write_text
from .unit_tests import judge_tests

USER_KEYS = ("code", "test", "entry_point")


@dataclass
class StudyData:
    train: str  # a data source for `leantune train`
    eval: str  # the held-out functions as a data source (eval loss)
    held_out: list[dict[str, Any]]  # records with function, prompt, test, entry_point


def prepare_data(source: str, out: Path, functions: int | None, split_seed: int, test_fraction: float,
                 workers: int = 2) -> StudyData:
    if source in (HUMANEVAL_TESTS, f"{HUMANEVAL_TESTS}:all"):
        held_out = builtin_records(f"{HUMANEVAL_TESTS}:test")[:functions]
        return StudyData(f"{HUMANEVAL_TESTS}:train", f"{HUMANEVAL_TESTS}:test", held_out)
    records = user_records(existing_file(source), workers)
    order = list(range(len(records)))
    random.Random(split_seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(records)))
    if len(records) - n_test < 1:
        raise LeantuneError(f"data file '{source}' has {len(records)} usable records; the study needs at least 2 "
                            "(one to train on, one held out)")
    test = [records[i] for i in order[:n_test]]
    train = [records[i] for i in order[n_test:]]
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        atomic_write_text(folder / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in part))
    return StudyData(str(folder / "train.jsonl"), str(folder / "test.jsonl"), test[:functions])


def user_records(path: Path, workers: int = 2) -> list[dict[str, Any]]:
    """The study records of a JSONL file whose reference tests pass on their own code."""
    records = [user_record(record, path, line) for line, record in read_jsonl(path)]
    if not records:
        raise LeantuneError(f"data file '{path}' holds no records")
    judged = judge_tests(records, [r["test"] for r in records], workers=workers)
    kept = [r for r, row in zip(records, judged) if row["status"] == "pass"]
    failing = [r["task_id"] for r, row in zip(records, judged) if row["status"] != "pass"]
    if failing:
        print(f"data file '{path}': {len(failing)} of {len(records)} reference tests do not pass on their own code "
              f"and are left out ({', '.join(failing[:5])}{', ...' if len(failing) > 5 else ''})", file=sys.stderr)
    return kept


def user_record(record: Any, path: Path, line: int) -> dict[str, Any]:
    where = f"data file '{path}', line {line}"
    if not isinstance(record, dict) or any(not isinstance(record.get(k), str) or not record[k].strip()
                                           for k in USER_KEYS):
        raise LeantuneError(f"{where}: a study record needs the non-empty strings {', '.join(USER_KEYS)}")
    entry_point, code = record["entry_point"], record["code"].rstrip() + "\n"
    for text, what in ((code, "code"), (record["test"], "test")):
        try:
            ast.parse(text)
        except SyntaxError as err:
            raise LeantuneError(f"{where}: '{what}' is not valid Python ({err.msg}, line {err.lineno})") from None
    if not entry_point.isidentifier() or f"def {entry_point}(" not in code:
        raise LeantuneError(f"{where}: 'code' does not define the entry point '{entry_point}'")
    body = reference_body(record["test"], entry_point)
    return {"task_id": f"{path.name}:{line}", "entry_point": entry_point, "function": code,
            "prompt": model_prompt(code, entry_point), "completion": body,
            "test": unit_test_header(entry_point) + body}


def reference_body(test: str, entry_point: str) -> str:
    """The indented body of the test: the first `def test...()` function's, or the whole source
    (asserts at top level); imports of the entry point are dropped (it is defined beside the test)."""
    module = ast.parse(test)
    functions = [s for s in module.body if isinstance(s, ast.FunctionDef) and s.name.startswith("test")]
    statements = functions[0].body if functions else module.body
    kept = [s for s in statements if not _imports_name(s, entry_point)]
    if not kept:
        raise LeantuneError(f"the test of '{entry_point}' has no statements")
    return "".join("    " + line + "\n" for s in kept for line in ast.unparse(s).splitlines())


def _imports_name(statement: ast.stmt, name: str) -> bool:
    return isinstance(statement, ast.ImportFrom) and any(alias.name == name for alias in statement.names)

