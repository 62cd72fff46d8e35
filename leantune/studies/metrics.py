"""Per generated test: coverage of the focal function, mutation score, CodeBLEU.

Parse and pass come from `unit_tests.judge_tests`; `evaluate` takes its rows and adds `coverage`,
`mutation` and `codebleu` to each. The per-method means and intervals are in `stats`.

Coverage: the sandbox runs a driver that writes the record's function to a file in its work
directory, measures that file with coverage.py (`branch=True`, no data file, no config file) while
the test runs, and prints a one-line JSON summary on stdout, read back from the outcome's stdout
tail. Only the focal function's body counts: its `def` line runs when the module is defined,
whatever the test does, and helpers defined beside it (HumanEval/10, /38, /50) are not the
function under test. A function without branches has a single path: its branch coverage is its
line coverage. A test that did not parse, or whose run stopped at a limit, covers nothing.

Mutation score: the mutants of `mutants` (operators over `ast`; its docstring says why no mutation
tool was used), at most `MUTANT_CAP` per function. Each mutant runs with the test in the sandbox:
killed when the test fails, errors or times out; survived when it passes. A mutant on a line the
test never executes on the reference is not run and counts as survived ("no coverage"), as in PIT
and in the paper. A test that does not pass on the reference kills nothing: mutation analysis
needs a test that accepts the original (a failing test would "kill" every mutant); its mutants are
not run and its score is 0. Score = killed / mutants, per test; `mutation_score_all` averages it
over every generated test, `mutation_score_passing` over the passing ones.

CodeBLEU (against the record's reference test): computed by the `codebleu` package with the
tree-sitter Python grammar (the `study` extra), offline, in this process (it parses, it runs
nothing); None when the package is not installed.
"""
from __future__ import annotations

import ast
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

from ..data.humaneval import unit_test_name
from ..eval.sandbox import Limits, Outcome, run_many
from .mutants import MUTANT_CAP, MUTANT_SEED, Mutant, focal_node, mutants, mutation_sites
from .unit_tests import parses

# One CPU second: a reference test takes milliseconds; a mutant that loops forever (a dropped
# `n = n // 2`) is then stopped after one second instead of the five a generated test gets.
MUTANT_LIMITS = Limits(wall_seconds=10.0, cpu_seconds=1, memory_bytes=1 << 30)
COVERAGE_LIMITS = Limits(wall_seconds=20.0, cpu_seconds=10, memory_bytes=1 << 30)  # tracing is slower
MARKER = "@@leantune-focal-coverage@@"
KILLED, SURVIVED, NO_COVERAGE = "killed", "survived", "no coverage"


def focal_lines(function_source: str, entry_point: str) -> tuple[int, int]:
    """First and last line of the focal function's body (its docstring line included: coverage
    does not count a docstring as a statement)."""
    node = focal_node(ast.parse(function_source), entry_point)
    return node.body[0].lineno, node.end_lineno


# -- coverage in the sandbox -------------------------------------------------------------------

@dataclass(frozen=True)
class FocalCoverage:
    executed_lines: tuple[int, ...]
    missing_lines: tuple[int, ...]
    branches_covered: int
    branches_total: int

    @property
    def lines_covered(self) -> int:
        return len(self.executed_lines)

    @property
    def lines_total(self) -> int:
        return len(self.executed_lines) + len(self.missing_lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lines_covered": self.lines_covered, "lines_total": self.lines_total}


# Runs in the sandbox after a header that binds _FUNCTION, _TEST, _TEST_NAME, _FIRST, _LAST. The
# function and the test share a namespace of their own, so the test cannot see the driver's names.
_DRIVER = r'''
import json as _json, os as _os, sys as _sys
import coverage as _coverage

def _summary(cov, path):
    report = _os.path.join(_os.path.dirname(path), "focal-coverage.json")
    cov.json_report(outfile=report)
    with open(report, encoding="utf-8") as handle:
        entry = next(iter(_json.load(handle)["files"].values()))
    inside = lambda line: _FIRST <= line <= _LAST
    branches = [b for b in entry["executed_branches"] + entry["missing_branches"] if inside(b[0])]
    return {"executed": [n for n in entry["executed_lines"] if inside(n)],
            "missing": [n for n in entry["missing_lines"] if inside(n)],
            "branches_hit": sum(inside(b[0]) for b in entry["executed_branches"]), "branches": len(branches)}

def _emit(payload):
    try:
        _sys.stdout.flush()
    except Exception:
        pass
    _os.write(1, ("\n" + _MARKER + _json.dumps(payload, separators=(",", ":")) + "\n").encode())

_path = _os.path.abspath("focal.py")
with open(_path, "w", encoding="utf-8") as _handle:
    _handle.write(_FUNCTION)
_cov = _coverage.Coverage(data_file=None, branch=True, include=[_path], config_file=False)
_ns = {"__name__": "sandboxed_program"}
_cov.start()
try:
    exec(compile(_FUNCTION, _path, "exec"), _ns)
    exec(compile(_TEST, "test.py", "exec"), _ns)
    _ns[_TEST_NAME]()
finally:
    _cov.stop()
    try:
        _emit(_summary(_cov, _path))
    except Exception as _err:
        _emit({"error": type(_err).__name__ + ": " + str(_err)})
'''


def coverage_program(function_source: str, entry_point: str, test_source: str) -> str:
    """The sandbox program that runs `test_source` against the function under coverage."""
    first, last = focal_lines(function_source, entry_point)
    header = (f"_FUNCTION = {function_source!r}\n_TEST = {test_source!r}\n"
              f"_TEST_NAME = {unit_test_name(entry_point)!r}\n_FIRST, _LAST = {first}, {last}\n"
              f"_MARKER = {MARKER!r}\n")
    return header + _DRIVER


def parse_coverage(outcome: Outcome) -> FocalCoverage | None:
    """The driver's summary from the stdout tail; None when the child stopped before printing it
    (a limit) or coverage could not report (then the reason is in the summary's "error")."""
    lines = [line for line in outcome.stdout.splitlines() if line.startswith(MARKER)]
    if not lines:
        return None
    try:
        data = json.loads(lines[-1][len(MARKER):])
        return FocalCoverage(tuple(data["executed"]), tuple(data["missing"]), int(data["branches_hit"]),
                             int(data["branches"]))
    except (ValueError, KeyError, TypeError):
        return None


def measure_coverage(records: Sequence[dict[str, Any]], tests: Sequence[str], limits: Limits | None = None,
                     workers: int = 2, progress: bool = False) -> list[FocalCoverage | None]:
    """Coverage of each record's function by its test (tests that do not parse: None)."""
    runnable = [i for i, test in enumerate(tests) if parses(test)]
    jobs = [(coverage_program(records[i]["function"], records[i]["entry_point"], tests[i]), None)
            for i in runnable]
    outcomes = run_many(jobs, limits or COVERAGE_LIMITS, workers, progress=progress, desc="coverage")
    found: list[FocalCoverage | None] = [None] * len(tests)
    for i, outcome in zip(runnable, outcomes):
        found[i] = parse_coverage(outcome)
    return found


# -- mutation score ----------------------------------------------------------------------------

@dataclass(frozen=True)
class MutationResult:
    sites: int  # mutation sites of the function, before the cap
    verdicts: tuple[str, ...]  # per mutant, in site order: killed / survived / no coverage
    ran: bool  # False when the test does not pass on the reference (nothing run, nothing killed)
    seconds: float = 0.0  # sandbox time of the mutant runs

    @property
    def total(self) -> int:
        return len(self.verdicts)

    @property
    def killed(self) -> int:
        return self.verdicts.count(KILLED)

    @property
    def no_coverage(self) -> int:
        return self.verdicts.count(NO_COVERAGE)

    @property
    def survived(self) -> int:
        return self.total - self.killed  # "no coverage" included

    @property
    def score(self) -> float | None:
        return self.killed / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "killed": self.killed, "survived": self.survived,
                "no_coverage": self.no_coverage, "score": self.score}


def _function_mutants(records: Sequence[dict[str, Any]], cap: int, seed: int) -> Iterator[tuple[list[Mutant], int]]:
    """Each record's mutants and site count; a function shared by several rows is mutated once."""
    cache: dict[tuple[str, str], tuple[list[Mutant], int]] = {}
    for record in records:
        key = (record["function"], record["entry_point"])
        if key not in cache:
            cache[key] = (mutants(*key, cap=cap, seed=seed), len(mutation_sites(*key)))
        yield cache[key]


def measure_mutation(records: Sequence[dict[str, Any]], tests: Sequence[str], passed: Sequence[bool],
                     executed: Sequence[set[int] | None], cap: int = MUTANT_CAP, seed: int = MUTANT_SEED,
                     limits: Limits | None = None, workers: int = 2, progress: bool = False) -> list[MutationResult]:
    """Each test's verdict on its function's mutants. `passed`: the test passes on the reference;
    `executed`: the lines it runs there (None: unknown, then every mutant is run)."""
    plans, jobs = [], []
    for record, test, ok, lines, (found, sites) in zip(records, tests, passed, executed,
                                                      _function_mutants(records, cap, seed)):
        verdicts: list[str | int] = []
        for mutant in found:
            if not ok:
                verdicts.append(SURVIVED)
            elif lines is not None and mutant.site.line not in lines:
                verdicts.append(NO_COVERAGE)
            else:
                verdicts.append(len(jobs))  # filled in from the run below
                jobs.append((mutant.source + "\n\n" + test, unit_test_name(record["entry_point"])))
        plans.append((sites, verdicts, bool(ok)))
    outcomes = run_many(jobs, limits or MUTANT_LIMITS, workers, progress=progress, desc="mutants")
    results = []
    for sites, verdicts, ran in plans:
        runs = [outcomes[v] for v in verdicts if isinstance(v, int)]
        final = tuple(v if isinstance(v, str) else SURVIVED if outcomes[v].status == "pass" else KILLED
                      for v in verdicts)
        results.append(MutationResult(sites, final, ran, sum(o.seconds for o in runs)))
    return results


# -- CodeBLEU ----------------------------------------------------------------------------------

def codebleu_score(test: str, reference: str) -> float | None:
    """CodeBLEU of `test` against `reference` (equal weights), or None without the package."""
    try:
        # optional (the `study` extra): codebleu and its tree-sitter grammar are not core dependencies
        from codebleu import calc_codebleu
    except ImportError:
        return None
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # it warns on the root logger for every test without data flow
    try:
        return float(calc_codebleu([reference], [test], lang="python")["codebleu"])
    except ImportError:  # the package is there, the Python grammar is not
        return None
    finally:
        logging.disable(previous)


# -- per test, for a whole set -----------------------------------------------------------------

def evaluate(records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], cap: int = MUTANT_CAP,
             seed: int = MUTANT_SEED, coverage_limits: Limits | None = None, mutant_limits: Limits | None = None,
             workers: int = 2, progress: bool = False) -> list[dict[str, Any]]:
    """Copies of `judge_tests` rows with "coverage" (FocalCoverage.to_dict or None), "mutation"
    (MutationResult.to_dict) and "codebleu" (float or None) added."""
    tests = [row["test"] for row in rows]
    # a test that timed out on the reference would only time out again, slower, under tracing
    wanted = [i for i, row in enumerate(rows) if row["status"] not in ("syntax", "timeout")]
    measured = measure_coverage([records[i] for i in wanted], [tests[i] for i in wanted], coverage_limits,
                                workers, progress)
    found: list[FocalCoverage | None] = [None] * len(rows)
    for i, coverage in zip(wanted, measured):
        found[i] = coverage
    executed = [set(c.executed_lines) if c else None for c in found]
    mutation = measure_mutation(records, tests, [row["status"] == "pass" for row in rows], executed, cap, seed,
                                mutant_limits, workers, progress)
    return [{**row, "coverage": c.to_dict() if c else None, "mutation": m.to_dict(),
             "codebleu": codebleu_score(row["test"], record["test"])}
            for record, row, c, m in zip(records, rows, found, mutation)]


def line_coverage(row: dict[str, Any]) -> float:
    coverage = row.get("coverage")
    if not coverage or not coverage["lines_total"]:
        return 0.0
    return coverage["lines_covered"] / coverage["lines_total"]


def branch_coverage(row: dict[str, Any]) -> float:
    coverage = row.get("coverage")
    if not coverage:
        return 0.0
    if not coverage["branches_total"]:
        return line_coverage(row)  # one path: covering it is running the function
    return coverage["branches_covered"] / coverage["branches_total"]


def _passing(rows: Sequence[dict[str, Any]], passing_only: bool) -> list[dict[str, Any]]:
    return [row for row in rows if row["status"] == "pass" or not passing_only]


def coverage_values(rows: Sequence[dict[str, Any]], kind: str = "line", passing_only: bool = False) -> list[float]:
    measure = {"line": line_coverage, "branch": branch_coverage}[kind]
    return [measure(row) for row in _passing(rows, passing_only)]


def mutation_values(rows: Sequence[dict[str, Any]], passing_only: bool = False) -> list[float]:
    """Per-test mutation scores (functions without a single mutant are left out)."""
    return [row["mutation"]["score"] for row in _passing(rows, passing_only) if row["mutation"]["score"] is not None]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mutation_score_all(rows: Sequence[dict[str, Any]]) -> float | None:
    """Mean mutation score over every generated test (those that do not pass score 0)."""
    return _mean(mutation_values(rows))


def mutation_score_passing(rows: Sequence[dict[str, Any]]) -> float | None:
    """Mean mutation score over the tests that pass on the reference (None: no test passes)."""
    return _mean(mutation_values(rows, passing_only=True))


def codebleu_values(rows: Sequence[dict[str, Any]]) -> list[float]:
    return [row["codebleu"] for row in rows if row.get("codebleu") is not None]
