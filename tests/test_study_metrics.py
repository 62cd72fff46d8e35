"""The study's per-test metrics (coverage, mutation score, CodeBLEU) and per-method statistics,
on hand-written tests of small functions whose numbers can be counted by hand."""
import pytest

from leantune.data.humaneval import load_split
from leantune.eval.sandbox import Limits, Outcome
from leantune.studies import metrics, stats
from leantune.studies.metrics import KILLED, NO_COVERAGE, SURVIVED, evaluate, measure_coverage, parse_coverage
from leantune.studies.mutants import mutants, mutation_sites
from leantune.studies.unit_tests import judge_tests

# Lines 3-5 are the body; the docstring (line 2) is not a statement. Its 8 mutation sites, in order:
# line 3: drop the if, negate it, > -> >=, 0 -> 1; line 4: drop the return, + -> -, 1 -> 2;
# line 5: drop the return.
STEP = '''def step(x):
    """Doc."""
    if x > 0:
        return x + 1
    return -x
'''
RECORD = {"task_id": "toy/0", "entry_point": "step", "function": STEP,
          "test": "def test_step():\n    assert step(1) == 2\n    assert step(-3) == 3\n"}
TESTS = {
    # both branches, but x = 0 never: only the boundary mutant (> -> >=) survives
    "strong": RECORD["test"],
    # calls the function and checks nothing: kills no mutant; line 5 never runs
    "no_assert": "def test_step():\n    step(1)\n",
    "syntax": "def test_step(:\n    pass\n",
    "fails": "def test_step():\n    assert step(1) == 3\n",
    # one branch, asserted: kills what lines 3-4 decide, line 5's mutant has no coverage
    "one_branch": "def test_step():\n    assert step(1) == 2\n",
}


@pytest.fixture(scope="module")
def rows():
    records = [RECORD] * len(TESTS)
    evaluated = evaluate(records, judge_tests(records, list(TESTS.values())))
    return dict(zip(TESTS, evaluated))


def counts(row):
    m = row["mutation"]
    return m["total"], m["killed"], m["survived"], m["no_coverage"]


def lines_and_branches(row):
    c = row["coverage"]
    return c["lines_covered"], c["lines_total"], c["branches_covered"], c["branches_total"]


def test_a_strong_test_covers_everything_and_kills_all_but_the_boundary_mutant(rows):
    row = rows["strong"]
    assert row["status"] == "pass"
    assert lines_and_branches(row) == (3, 3, 2, 2)
    assert row["coverage"]["executed_lines"] == (3, 4, 5)
    assert counts(row) == (8, 7, 1, 0)
    assert row["mutation"]["verdicts"] == (KILLED, KILLED, SURVIVED, KILLED, KILLED, KILLED, KILLED, KILLED)
    assert row["mutation"]["score"] == 7 / 8 and row["mutation"]["ran"]
    assert row["codebleu"] is None or row["codebleu"] == pytest.approx(1.0)  # it is the reference


def test_a_test_without_assertion_passes_covers_one_branch_and_kills_nothing(rows):
    row = rows["no_assert"]
    assert row["status"] == "pass"
    assert lines_and_branches(row) == (2, 3, 1, 2)
    assert row["coverage"]["missing_lines"] == (5,)
    assert counts(row) == (8, 0, 8, 1)
    assert row["mutation"]["verdicts"][-1] == NO_COVERAGE and row["mutation"]["score"] == 0.0


def test_an_asserting_test_of_one_branch_leaves_the_other_branch_mutant_uncovered(rows):
    row = rows["one_branch"]
    assert lines_and_branches(row) == (2, 3, 1, 2)
    assert counts(row) == (8, 6, 2, 1)
    assert row["mutation"]["score"] == 6 / 8


def test_a_syntax_error_covers_nothing_and_kills_nothing(rows):
    row = rows["syntax"]
    assert (row["status"], row["coverage"]) == ("syntax", None)
    assert counts(row) == (8, 0, 8, 0) and not row["mutation"]["ran"]
    assert metrics.line_coverage(row) == metrics.branch_coverage(row) == 0.0


def test_a_test_failing_on_the_reference_is_measured_for_coverage_but_kills_nothing(rows):
    row = rows["fails"]
    assert row["status"] == "fail"
    assert lines_and_branches(row) == (2, 3, 1, 2)
    assert counts(row) == (8, 0, 8, 0) and not row["mutation"]["ran"]
    assert row["mutation"]["seconds"] == 0.0  # no mutant was run


def test_mutation_score_over_all_tests_and_over_the_passing_ones(rows):
    every = list(rows.values())
    assert metrics.mutation_score_all(every) == pytest.approx((7 / 8 + 6 / 8) / 5)
    assert metrics.mutation_score_passing(every) == pytest.approx((7 / 8 + 0 + 6 / 8) / 3)
    assert metrics.mutation_score_passing([rows["syntax"]]) is None
    assert metrics.coverage_values(every, "branch") == [1.0, 0.5, 0.0, 0.5, 0.5]


def test_the_operators_one_mutant_per_site_on_the_focal_body_only():
    source = '''import math

def helper(y):
    return y + 1

def g(a, b, s):
    """Doc: untouched."""
    total = a * 2
    total += b
    if a < b and s != "":
        return [c for c in s if c in "xy"]
    while False:
        pass
    return f"{a}" if a is None else total
'''
    found = [(s.operator, s.line, s.description) for s in mutation_sites(source, "g")]
    assert found == [
        ("drop", 8, "Assign -> pass"), ("arithmetic", 8, "Mult -> Div"), ("constant", 8, "2 -> 3"),
        ("drop", 9, "AugAssign -> pass"), ("arithmetic", 9, "Add -> Sub"),
        ("drop", 10, "If -> pass"), ("negate", 10, "If condition -> not"), ("boolean", 10, "And -> Or"),
        ("comparison", 10, "Lt -> LtE"), ("comparison", 10, "NotEq -> Eq"), ("constant", 10, "'' -> 'x'"),
        ("drop", 11, "Return -> pass"), ("negate", 11, "comprehension if -> not"),
        ("comparison", 11, "In -> NotIn"), ("constant", 11, "'xy' -> ''"),
        ("drop", 12, "While -> pass"), ("negate", 12, "While condition -> not"), ("constant", 12, "False -> True"),
        ("drop", 14, "Return -> pass"), ("negate", 14, "IfExp condition -> not"),
        ("comparison", 14, "Is -> IsNot")]
    sources = {m.site.description: m.source for m in mutants(source, "g")}
    assert "total = a / 2" in sources["Mult -> Div"] and "return y + 1" in sources["Mult -> Div"]
    assert "if not (a < b and s != '')" in sources["If condition -> not"]
    assert "return f'{a}' if not a is None else total" in sources["IfExp condition -> not"]


def test_the_cap_draws_the_same_mutants_every_time():
    source = "def many(x):\n" + "".join(f"    x = x + {i}\n" for i in range(20)) + "    return x\n"
    assert len(mutation_sites(source, "many")) == 61  # per line: drop, + -> -, i -> i + 1; and the return
    drawn = [m.index for m in mutants(source, "many", cap=30, seed=0)]
    assert len(drawn) == 30 and drawn == sorted(drawn) and len(set(drawn)) == 30
    assert drawn == [m.index for m in mutants(source, "many", cap=30, seed=0)]
    assert drawn != [m.index for m in mutants(source, "many", cap=30, seed=1)]


HELPER = '''def double(x):
    return x * 2


def outer(x):
    if x:
        return double(x)
    return 0
'''


def test_coverage_counts_only_the_focal_function_and_survives_a_noisy_test():
    record = {"entry_point": "outer", "function": HELPER}
    noisy = "def test_outer():\n    print('x' * 5000)\n    assert outer(0) == 0\n"
    found = measure_coverage([record, record], ["def test_outer():\n    assert outer(2) == 4\n", noisy])
    assert (found[0].executed_lines, found[0].missing_lines) == ((6, 7), (8,))  # double's line 2 not counted
    assert (found[0].branches_covered, found[0].branches_total) == (1, 2)
    assert (found[1].executed_lines, found[1].missing_lines) == ((6, 8), (7,))


def test_a_test_stopped_by_a_limit_reports_no_coverage():
    record = {"entry_point": "step", "function": STEP}
    endless = "def test_step():\n    while True:\n        pass\n"
    assert measure_coverage([record], [endless], Limits(wall_seconds=60.0, cpu_seconds=1)) == [None]
    assert parse_coverage(Outcome(status="pass", stdout="no summary here\n")) is None


def test_a_humaneval_record_with_its_reference_test():
    record = next(r for r in load_split("test") if r["task_id"] == "HumanEval/3")  # below_zero
    row = evaluate([record], judge_tests([record], [record["test"]]))[0]
    assert row["status"] == "pass" and lines_and_branches(row) == (6, 6, 4, 4)
    assert counts(row) == (13, 13, 0, 0)


def test_codebleu_of_a_test_against_the_reference():
    pytest.importorskip("codebleu")
    assert metrics.codebleu_score(RECORD["test"], RECORD["test"]) == pytest.approx(1.0)
    assert 0.0 < metrics.codebleu_score(TESTS["one_branch"], RECORD["test"]) < 1.0


# -- statistics --------------------------------------------------------------------------------

def test_wilson_interval_against_hand_computed_values():
    # 8/10: centre (0.8 + z²/20) / (1 + z²/10), half-width z·sqrt(0.016 + z²/400) / (1 + z²/10)
    assert stats.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # upper z²/(10 + z²)
    assert stats.rate(0, 0) == stats.Estimate(None, None, None, 0)


def test_bootstrap_interval_is_seeded_and_zero_width_on_a_constant_sample():
    assert stats.bootstrap_interval([0.4] * 12) == (pytest.approx(0.4), pytest.approx(0.4))
    values = [0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 0.75, 0.0]
    low, high = stats.bootstrap_interval(values)
    assert (low, high) == stats.bootstrap_interval(values)
    assert 0.0 <= low < sum(values) / len(values) < high <= 1.0
    assert stats.mean_estimate([]).value is None


def test_mcnemar_exact_against_the_binomial_on_the_discordant_pairs():
    # Fagerland, Lydersen & Laake (2013): 1 and 7 discordant pairs, exact p = 2·(1 + 8)/2⁸ = 0.0703
    assert stats.mcnemar_p(1, 7) == pytest.approx(0.0703125)
    assert stats.mcnemar_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert stats.mcnemar_p(3, 3) == stats.mcnemar_p(0, 0) == 1.0
    test = stats.mcnemar_exact([True, True, False, False, True], [True, False, False, True, False])
    assert (test.first_only, test.second_only, test.p_value) == (2, 1, 1.0)


def test_verdict_says_no_measurable_difference_unless_apart():
    low, high = stats.Estimate(0.3, 0.2, 0.4, 40), stats.Estimate(0.7, 0.6, 0.8, 40)
    assert stats.verdict(low, stats.Estimate(0.35, 0.25, 0.45, 40)) == stats.NO_DIFFERENCE
    assert stats.verdict(low, high, names=("base", "tuned")) == "tuned is higher"
    assert stats.verdict(low, high, p_value=0.07) == stats.NO_DIFFERENCE  # the paired test decides
    assert stats.verdict(high, low, p_value=0.01, names=("base", "tuned")) == "base is higher"


def test_cost_efficiency_is_gain_per_share_of_trainable_parameters():
    assert stats.cost_efficiency(0.10, 0.05, 1_000, 100_000) == pytest.approx(5.0)
    assert stats.cost_efficiency(0.10, 0.05, 100_000, 100_000) == pytest.approx(0.05)  # full fine-tuning
    with pytest.raises(ValueError):
        stats.cost_efficiency(0.1, 0.0, 0, 10)


def test_summary_and_comparison_of_two_methods(rows):
    base = [dict(r, task_id=f"toy/{i}") for i, r in enumerate(rows.values())]
    tuned = [dict(r, status="pass") for r in base]
    summary = stats.summarize_method(base)
    assert summary["pass"].value == 3 / 5 and summary["parse"].value == 4 / 5
    assert summary["mutation_score"].value == pytest.approx((7 / 8 + 6 / 8) / 5)
    assert summary["line_coverage_passing"].value == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    compared = stats.compare_methods(base, tuned)
    assert compared["pass"]["mcnemar"] == stats.McNemar(0, 2, 0.5)
    assert compared["pass"]["verdict"] == stats.NO_DIFFERENCE
