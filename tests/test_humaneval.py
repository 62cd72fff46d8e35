import ast
import io
import sys
import textwrap

import pytest

import leantune as lt
from leantune.data import humaneval
from leantune.eval.generation import generate
from leantune.eval.sandbox import Limits, run_many
from leantune.studies.unit_tests import before_after, judge_tests


def _program(record, test_source=None):
    return record["function"] + "\n\n" + (test_source or record["test"])


def test_fixed_split_sizes_and_rule():
    train, test, everything = (humaneval.load_split(s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(everything)) == (124, 40, 164)
    train_ids = {r["task_id"] for r in train}
    test_ids = {r["task_id"] for r in test}
    assert not train_ids & test_ids
    assert train_ids | test_ids == {r["task_id"] for r in everything}
    assert sorted(humaneval.task_number(t) for t in test_ids) == list(range(3, 160, 4))
    assert humaneval.load_split("test") == test  # the same every time
    assert not humaneval.EXCLUDED


def test_unknown_split_is_a_user_error():
    with pytest.raises(lt.LeantuneError, match="split 'validation'"):
        humaneval.load_split("validation")


def test_records_have_the_documented_shape():
    for record in humaneval.load_split("all"):
        name = record["entry_point"]
        header = f"def test_{name}():\n"
        assert record["prompt"].startswith(humaneval.INSTRUCTION.format(name=name))
        assert record["function"] in record["prompt"]
        assert record["prompt"].endswith(header)
        assert record["test"] == header + record["completion"]
        assert record["completion"].startswith("    ") and record["completion"].endswith("\n")
        tree = ast.parse(record["test"])
        calls = {node.func.id for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert name in calls, record["task_id"]
        assert "candidate" not in names and "METADATA" not in names
        assert any(isinstance(node, ast.Assert) for node in ast.walk(tree)), record["task_id"]


def test_rewrite_handles_helpers_metadata_loops_tolerances_and_messages():
    source = textwrap.dedent('''
        import math

        METADATA = {'author': 'x'}

        def helper(v):
            return v * 2

        def check(candidate):

            # a comment
            print
            assert True, "never fails"
            assert candidate(1) == helper(1), "message"
            assert abs(candidate(0.5) - 1.0) < 1e-6
            for i in range(3):
                assert candidate(i) == 2 * i
            fn = candidate
            assert fn(2) == 4
    ''')
    statements = humaneval.check_statements(source, "double")
    body = humaneval.trimmed_body(statements, max_chars=10_000)
    expected = textwrap.dedent('''\
        import math
        def helper(v):
            return v * 2
        assert double(1) == helper(1)
        assert abs(double(0.5) - 1.0) < 1e-06
        for i in range(3):
            assert double(i) == 2 * i
        fn = double
        assert fn(2) == 4
    ''')
    assert body == textwrap.indent(expected, "    ")
    function = "def double(x):\n    return 2 * x\n"
    wrong = "def double(x):\n    return 2 * x + (x == 2)\n"
    test = humaneval.unit_test_header("double") + body
    outcomes = run_many([(function + "\n" + test, "test_double"), (wrong + "\n" + test, "test_double")])
    assert [o.status for o in outcomes] == ["pass", "fail"]


def test_trimming_keeps_a_prefix_of_whole_statements():
    statements = [f"assert f({i}) == {i}" for i in range(20)]
    body = humaneval.trimmed_body(statements, max_chars=100)
    lines = body.splitlines()
    assert len(body) <= 100 and lines == [f"    {s}" for s in statements[:len(lines)]]
    assert humaneval.trimmed_body(["assert " + "x" * 200], max_chars=10) == "    assert " + "x" * 200 + "\n"
    setup_then_loop = ["import math", "for i in range(3):\n    assert f(i) == i", "assert f(9) == 9"]
    assert humaneval.trimmed_body(setup_then_loop, max_chars=5) == (
        "    import math\n    for i in range(3):\n        assert f(i) == i\n")


def test_a_check_without_statements_is_rejected():
    with pytest.raises(lt.LeantuneError, match="no statements"):
        humaneval.check_statements("def check(candidate):\n    assert True\n", "f")


def test_every_reference_test_passes_and_a_wrong_solution_fails():
    """All 164 rewritten tests pass against the reference solution, in full and trimmed; a
    function that returns None fails nearly all of them (the tests do test something)."""
    records = humaneval.load_split("all")
    raw = {p["task_id"]: p for p in humaneval._raw_problems()}
    full_tests = [humaneval.unit_test_header(r["entry_point"]) + humaneval.trimmed_body(
        humaneval.check_statements(raw[r["task_id"]]["test"], r["entry_point"]), max_chars=10**9)
        for r in records]
    broken = [r["function"] + f"\n\ndef {r['entry_point']}(*args, **kwargs):\n    return None\n" for r in records]
    jobs = ([(_program(r), f"test_{r['entry_point']}") for r in records]
            + [(_program(r, full), f"test_{r['entry_point']}") for r, full in zip(records, full_tests)]
            + [(b + "\n\n" + r["test"], f"test_{r['entry_point']}") for r, b in zip(records, broken)])
    # Correctness, not speed: a generous wall clock so a busy machine cannot fail a slow reference.
    outcomes = run_many(jobs, Limits(wall_seconds=120.0))
    n = len(records)
    failures = {(kind, r["task_id"]): (o.status, o.detail) for kind, chunk in (("trimmed", outcomes[:n]), ("full", outcomes[n:2 * n]))
                for r, o in zip(records, chunk) if o.status != "pass"}
    assert not failures
    caught = sum(o.status != "pass" for o in outcomes[2 * n:])
    assert caught >= 160


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as an interactive run's is."""

    def isatty(self):
        return True


def test_the_before_after_study_shows_progress_bars_on_a_terminal(monkeypatch):
    model, tokenizer = lt.load_model("tiny-llama"), lt.load_tokenizer("tiny-llama")
    records = humaneval.load_split("test")[:2]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    before_after(model, tokenizer, records, max_new_tokens=4, print_table=False)
    # a random model's tests do not parse, so the sandbox bar is shown with tests that do
    judge_tests(records, [r["test"] for r in records], progress=True, desc="[reference] sandbox")
    shown = terminal.getvalue()
    for label in ("base", "tuned"):
        assert f"\r[{label}] generating:   0%|          | 0/2 [" in shown
    assert "\r[reference] sandbox:   0%|          | 0/2 [" in shown


@pytest.mark.parametrize("stream, progress", [(io.StringIO, True), (Terminal, False)])
def test_progress_bars_are_off_without_a_terminal_or_when_disabled(monkeypatch, stream, progress):
    model, tokenizer = lt.load_model("tiny-llama"), lt.load_tokenizer("tiny-llama")
    records = humaneval.load_split("test")[:2]
    monkeypatch.setattr(sys, "stderr", stream())
    generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=2, progress=progress, desc="generating")
    run_many([(r["function"] + "\n\n" + r["test"], f"test_{r['entry_point']}") for r in records],
             progress=progress, desc="sandbox")
    assert sys.stderr.getvalue() == ""
