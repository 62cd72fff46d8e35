"""The unit-test study in its smallest form, the main job's before/after: do generated tests parse, and pass?

For each held-out record (a `humaneval-tests` record: `prompt` ends with `def test_<name>():\\n`),
the base model (adapters disabled) and the tuned model each write a test body. The body is cut
where the function ends (the first line that is not indented), parsed with `ast`, and, when it
parses, run against the reference solution in the sandbox. Outcomes per test: "syntax" (does not
parse, not run), or the sandbox's pass / fail / error / timeout / killed. A pass counts as "pass
with a call" when the test also calls the function under test, since an empty-handed test passes
trivially.
"""
from __future__ import annotations

import ast
import json
import string
import sys
import time
from typing import Any, Callable, Sequence

from torch import nn

from .. import api
from ..data import builtin_records
from ..data.formats import HUMANEVAL_TESTS
from ..data.humaneval import unit_test_name
from ..errors import LeantuneError
from ..eval.generation import generate
from ..eval.sandbox import Limits, run_many
from ..files import atomic_write_text

OUTCOME_KEYS = ("pass", "fail", "error", "timeout", "killed", "syntax")
# A line that starts at column 0 ends the test function: stop generating there.
END_OF_FUNCTION = tuple("\n" + c for c in string.ascii_letters + string.digits + string.punctuation)
DEFAULT_LIMITS = Limits(wall_seconds=10.0, cpu_seconds=5, memory_bytes=1 << 30)


def extract_test(record: dict[str, Any], generated: str, hit_budget: bool = False) -> str:
    """`def test_<name>():` plus the indented lines of `generated` up to the first unindented one.

    A generation that ran out of tokens (`hit_budget`) inside the body loses its unfinished last
    line: the budget cut it, not the model.
    """
    body = []
    for line in generated.splitlines():
        if line.strip() and not line[0].isspace():
            break
        body.append(line)
    else:
        if hit_budget and not generated.endswith("\n") and len(body) > 1:
            body.pop()
    while body and not body[-1].strip():
        body.pop()
    return f"def {unit_test_name(record['entry_point'])}():\n" + "".join(line + "\n" for line in body)


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def calls_function(test_source: str, name: str) -> bool:
    """Whether the test calls `name`, the function under test; a test that defines its own `name`
    (a model often copies the function into its test) calls that copy, not the reference."""
    tree = ast.parse(test_source)
    if any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)) and
           getattr(node, "name", None) == name for node in ast.walk(tree)):
        return False
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
               for node in ast.walk(tree))


def judge_tests(records: Sequence[dict[str, Any]], tests: Sequence[str], limits: Limits | None = None,
                workers: int = 2, progress: bool = False, desc: str = "sandbox") -> list[dict[str, Any]]:
    """Parse each test and run the parsable ones against their record's reference function."""
    rows = [{"task_id": r["task_id"], "test": t, "parses": parses(t)} for r, t in zip(records, tests)]
    runnable = [i for i, row in enumerate(rows) if row["parses"]]
    outcomes = run_many([(records[i]["function"] + "\n\n" + tests[i], unit_test_name(records[i]['entry_point']))
                         for i in runnable], limits or DEFAULT_LIMITS, workers, progress=progress, desc=desc)
    for row in rows:
        row.update(status="syntax", detail="", calls_function=False)
    for i, outcome in zip(runnable, outcomes):
        rows[i].update(status=outcome.status, detail=outcome.detail,
                       calls_function=calls_function(tests[i], records[i]["entry_point"]))
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    counts = {key: sum(row["status"] == key for row in rows) for key in OUTCOME_KEYS}
    passing_with_call = sum(row["status"] == "pass" and row["calls_function"] for row in rows)
    return {
        "n": n,
        "parse_rate": sum(row["parses"] for row in rows) / n if n else 0.0,
        "pass_rate": counts["pass"] / n if n else 0.0,
        "pass_with_call_rate": passing_with_call / n if n else 0.0,
        "counts": counts,
    }


def _log(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def generate_and_judge(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]], label: str,
                       max_new_tokens: int, batch_size: int, temperature: float, top_p: float,
                       limits: Limits | None, workers: int, progress: bool,
                       prompts: Sequence[str] | None = None,
                       extract: Callable[[dict[str, Any], str, bool], str] | None = None,
                       stop: Sequence[str] = END_OF_FUNCTION, special_tokens: bool = True) -> dict[str, Any]:
    """Generate one test per record with `model` as it is, judge them, and summarize.

    By default each record's training prompt is continued and the body cut where the function
    ends (`extract_test`); `prompts`, `extract(record, generated, hit_budget)` and `stop` ask
    differently (the study's chat-template base row, whose rendered prompts take `special_tokens`
    False: the template writes them).
    """
    _log(f"[{label}] generating tests for {len(records)} functions...", progress)
    stats: dict[str, Any] = {}
    prompts = [r["prompt"] for r in records] if prompts is None else list(prompts)
    generations = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, stop=stop,
                           batch_size=batch_size, stats=stats, progress=progress, desc=f"[{label}] generating",
                           special_tokens=special_tokens)
    _log(f"[{label}] read {stats['prompt_tokens']} prompt tokens and generated {stats['new_tokens']} tokens "
         f"in {stats['seconds']:.1f} s; running the tests in the sandbox...", progress)
    start = time.perf_counter()
    extract = extract or extract_test
    tests = [extract(r, g, hit) for r, g, hit in zip(records, generations, stats["hit_budget"])]
    rows = judge_tests(records, tests, limits, workers, progress=progress, desc=f"[{label}] sandbox")
    for row, generated in zip(rows, generations):
        row["generated"] = generated
    summary = summarize(rows)
    summary.update(generation_seconds=stats["seconds"], new_tokens=stats["new_tokens"],
                   sandbox_seconds=time.perf_counter() - start, rows=rows)
    counts = ", ".join(f"{count} {key}" for key, count in summary["counts"].items())
    _log(f"[{label}] {counts} ({summary['sandbox_seconds']:.1f} s in the sandbox)", progress)
    return summary


def before_after(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]],
                 max_new_tokens: int = 192, eval_loss_before: float | None = None,
                 eval_loss_after: float | None = None, batch_size: int = 16, temperature: float = 0.0,
                 top_p: float = 1.0, limits: Limits | None = None, workers: int = 2,
                 progress: bool = True, print_table: bool = True) -> dict[str, Any]:
    """Generate a test per held-out record with the base model (adapters disabled) and with the
    tuned model, judge both sets, and return {"base": ..., "tuned": ..., "table": str}."""
    records = list(records)
    options = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
                   top_p=top_p, limits=limits, workers=workers, progress=progress)
    with api.disabled(model):
        base = generate_and_judge(model, tokenizer, records, "base", **options)
    tuned = generate_and_judge(model, tokenizer, records, "tuned", **options)
    base["eval_loss"], tuned["eval_loss"] = eval_loss_before, eval_loss_after
    result = {"base": base, "tuned": tuned}
    result["table"] = format_table(result)
    if print_table:
        print(result["table"], flush=True)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The before/after table: one row per model."""
    header = ("model", "eval loss", "parse%", "pass%", "pass+call%", *OUTCOME_KEYS)
    lines = [header]
    for label in ("base", "tuned"):
        s = result[label]
        loss = "-" if s.get("eval_loss") is None else f"{s['eval_loss']:.4f}"
        lines.append((label, loss, f"{100 * s['parse_rate']:.1f}%", f"{100 * s['pass_rate']:.1f}%",
                      f"{100 * s['pass_with_call_rate']:.1f}%", *(str(s["counts"][k]) for k in OUTCOME_KEYS)))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in lines]
    n = result["base"]["n"]
    text.append(f"({n} held-out functions; parse/pass: share of generated tests; pass+call: passing tests "
                "that call the function)")
    return "\n".join(text)


# -- after a training run ------------------------------------------------------------------------

STUDY_SPLIT = f"{HUMANEVAL_TESTS}:test"  # the held-out functions when the run has no eval data


def study_records(config: Any) -> list[dict[str, Any]]:
    """The held-out functions of a run's config: its eval data when that is a humaneval-tests split
    (the study needs reference solutions to run tests against), else an error naming the key."""
    source = config.data.eval if config.data.eval is not None else STUDY_SPLIT
    if source.split(":")[0] != HUMANEVAL_TESTS:
        raise LeantuneError(f"config key 'unit_test_table' needs functions with reference solutions, but data.eval "
                            f"is '{source}'; set data.eval to a {HUMANEVAL_TESTS} split (or null for {STUDY_SPLIT}), "
                            "or unit_test_table: false")
    return builtin_records(source)[:config.unit_test_limit]


def run_after_training(result: Any, config: Any) -> dict[str, Any]:
    """Base vs tuned model of a finished run (`lt.train`'s result) writing tests for the held-out
    functions; the whole result goes to out_dir/unit_tests.json, the per-model summaries are returned."""
    records = study_records(config)
    print(f"\nbefore/after: base and tuned model each write a unit test for {len(records)} held-out functions",
          file=sys.stderr, flush=True)
    summary = result.summary
    table = before_after(result.model, result.tokenizer, records, max_new_tokens=config.unit_test_max_new_tokens,
                         eval_loss_before=summary["eval_loss_before"], eval_loss_after=summary["eval_loss_after"],
                         progress=config.progress)
    atomic_write_text(result.out_dir / "unit_tests.json", json.dumps(table, indent=2, default=str) + "\n")
    return {label: {k: v for k, v in table[label].items() if k != "rows"} for label in ("base", "tuned")}
