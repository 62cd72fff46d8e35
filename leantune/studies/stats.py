"""Per method: rates and means with 95% intervals, paired tests between methods, cost-efficiency.

- Rates (parse, pass) carry a Wilson score interval, which stays inside [0, 1] and keeps its
  coverage for the small samples and extreme rates of a 40-function study (the normal
  approximation gives 1.0 ± 0 for 40/40).
- Means of per-test values (line and branch coverage, mutation score, CodeBLEU) carry a
  percentile bootstrap interval: `BOOTSTRAP_RESAMPLES` resamples with `BOOTSTRAP_SEED`, so a
  table is the same on every run. These values are bounded and skewed (many zeros), which is
  what the bootstrap is for.
- Two methods' pass/fail on the same functions are paired: McNemar's exact test, a two-sided
  binomial test with p = 1/2 on the discordant pairs (one passes, the other does not). It is
  exact for any count, where the chi-squared form needs about ten discordant pairs.
- `verdict` says "no measurable difference" when the paired test's p-value is at least 0.05
  (pass/fail) or, for means, when the two intervals overlap (stricter than a test at 5%: it errs
  towards "no difference").
- Cost-efficiency, as in the paper: the gain over the base model per share of the parameters
  trained, (metric - base metric) / (trainable / total); full fine-tuning (share 1) scores its gain.

CodeBLEU is a column: the `codebleu` package (with the tree-sitter Python grammar 0.21, the
`study` extra) installs from the package index as wheels and runs without network; without it,
the column's estimate is empty (n = 0).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist
from typing import Any, Callable, Sequence

import numpy as np

from .metrics import codebleu_values, coverage_values, mutation_values

CONFIDENCE = 0.95
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
NO_DIFFERENCE = "no measurable difference"


@dataclass(frozen=True)
class Estimate:
    value: float | None  # None: nothing to estimate from (n = 0)
    low: float | None
    high: float | None
    n: int

    def overlaps(self, other: "Estimate") -> bool:
        if None in (self.low, self.high, other.low, other.high):
            return True  # an empty estimate tells nothing apart
        return self.low <= other.high and other.low <= self.high

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n}


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of the rate successes / n ((0, 1) when n = 0: no information)."""
    if n == 0:
        return 0.0, 1.0
    z, p = _z(confidence), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(successes: int, n: int, confidence: float = CONFIDENCE) -> Estimate:
    low, high = wilson_interval(successes, n, confidence)
    return Estimate(successes / n if n else None, low if n else None, high if n else None, n)


def bootstrap_interval(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (non-empty)."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def mean_estimate(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                  confidence: float = CONFIDENCE) -> Estimate:
    if not len(values):
        return Estimate(None, None, None, 0)
    low, high = bootstrap_interval(values, resamples, seed, confidence)
    return Estimate(float(np.mean(values)), low, high, len(values))


@dataclass(frozen=True)
class McNemar:
    first_only: int  # pairs where only the first method passes
    second_only: int  # pairs where only the second passes
    p_value: float


def mcnemar_p(first_only: int, second_only: int) -> float:
    """Two-sided exact p-value: twice the smaller binomial tail of the discordant pairs, at most 1."""
    n, k = first_only + second_only, min(first_only, second_only)
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)  # exact: no rounding in the sum
    return float(min(Fraction(1), 2 * tail))


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> McNemar:
    """McNemar's exact test on paired outcomes (same functions, same order)."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes differ in length: {len(first)} and {len(second)}")
    first_only = sum(bool(a) and not b for a, b in zip(first, second))
    second_only = sum(bool(b) and not a for a, b in zip(first, second))
    return McNemar(first_only, second_only, mcnemar_p(first_only, second_only))


def verdict(first: Estimate, second: Estimate, p_value: float | None = None, names: tuple[str, str] = ("first", "second"),
            alpha: float = ALPHA) -> str:
    """Which estimate is higher, or NO_DIFFERENCE: decided by the paired test's p-value (< alpha)
    when there is one, else by whether the two intervals are apart."""
    if first.value is None or second.value is None:
        return NO_DIFFERENCE
    apart = p_value < alpha if p_value is not None else not first.overlaps(second)
    if not apart or first.value == second.value:
        return NO_DIFFERENCE
    return f"{names[0] if first.value > second.value else names[1]} is higher"


def cost_efficiency(metric: float, base_metric: float, trainable_parameters: int, total_parameters: int) -> float:
    """Gain over the base model per share of trainable parameters: 0.05 gained with 1% trained is 5.0."""
    if not 0 < trainable_parameters <= total_parameters:
        raise ValueError(f"trainable parameters ({trainable_parameters}) must be in 1..{total_parameters}")
    return (metric - base_metric) / (trainable_parameters / total_parameters)


# -- a method's rows (metrics.evaluate) --------------------------------------------------------

def summarize_method(rows: Sequence[dict[str, Any]], resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict[str, Estimate]:
    """Every column of the study for one method's evaluated rows."""
    n = len(rows)
    mean = functools.partial(mean_estimate, resamples=resamples, seed=seed)
    return {
        "parse": rate(sum(bool(row["parses"]) for row in rows), n),
        "pass": rate(sum(row["status"] == "pass" for row in rows), n),
        "pass_with_call": rate(sum(passes_with_call(row) for row in rows), n),
        "line_coverage": mean(coverage_values(rows, "line")),
        "line_coverage_passing": mean(coverage_values(rows, "line", passing_only=True)),
        "branch_coverage": mean(coverage_values(rows, "branch")),
        "branch_coverage_passing": mean(coverage_values(rows, "branch", passing_only=True)),
        "mutation_score": mean(mutation_values(rows)),
        "mutation_score_passing": mean(mutation_values(rows, passing_only=True)),
        "codebleu": mean(codebleu_values(rows)),
    }


def passes(row: dict[str, Any]) -> bool:
    return row["status"] == "pass"


def passes_with_call(row: dict[str, Any]) -> bool:
    """Passes, and calls the function under test (a test that calls nothing passes trivially)."""
    return row["status"] == "pass" and bool(row.get("calls_function"))


PAIRED_COLUMNS = {"pass": passes, "pass_with_call": passes_with_call}


def paired_passes(first: Sequence[dict[str, Any]], second: Sequence[dict[str, Any]],
                  passed: Callable[[dict[str, Any]], bool] = passes) -> tuple[list[bool], list[bool]]:
    """Pass/fail of both methods on the functions they both have, matched by task_id."""
    outcome = {row["task_id"]: passed(row) for row in second}
    shared = [row for row in first if row["task_id"] in outcome]
    return [passed(row) for row in shared], [outcome[row["task_id"]] for row in shared]


def compare_methods(first: Sequence[dict[str, Any]], second: Sequence[dict[str, Any]],
                    names: tuple[str, str] = ("base", "tuned")) -> dict[str, Any]:
    """Per column: both estimates and the verdict; pass and pass_with_call also carry McNemar's exact test."""
    a, b = summarize_method(first), summarize_method(second)
    tests = {column: mcnemar_exact(*paired_passes(first, second, passed)) for column, passed in PAIRED_COLUMNS.items()}
    result: dict[str, Any] = {}
    for column in a:
        p_value = tests[column].p_value if column in tests else None
        result[column] = {names[0]: a[column], names[1]: b[column],
                          "verdict": verdict(a[column], b[column], p_value, names)}
        if column in tests:
            result[column]["mcnemar"] = tests[column]
    return result
