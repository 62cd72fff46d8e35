"""`leantune study unit-tests`: settings, data, the chat-template base row, resuming, the report."""
from __future__ import annotations

import json
import re

import pytest

from leantune.cli import main
from leantune.errors import LeantuneError
from leantune.studies import method_run
from leantune.studies.chat_base import extract_chat_test
from leantune.studies.study_config import METHOD_SETTINGS, PAPER_METHODS, study_config
from leantune.studies.study_data import prepare_data, reference_body, user_record
from leantune.studies.study_findings import findings
from leantune.studies.unit_test_study import StudyInterrupted, run_in_subprocess, run_study
from leantune.studies.unit_tests import judge_tests

RECORD = {"task_id": "t/0", "entry_point": "double", "function": "def double(x):\n    return 2 * x\n"}


# -- settings ------------------------------------------------------------------------------------

def test_the_defaults_are_the_papers_settings_and_the_guides_learning_rates(tmp_path):
    config = study_config()
    assert config.methods == list(PAPER_METHODS) and config.models == ["smollm2-135m"]
    lora = config.train_document("smollm2-135m", "lora", tmp_path)
    assert lora["method"] == {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.1}
    assert (lora["schedule"], lora["warmup"], lora["lr"]) == ("linear", 0.1, 3e-3)
    prompt = config.train_document("smollm2-135m", "prompt", tmp_path)
    assert prompt["method"] == {"name": "prompt", "num_virtual_tokens": 20, "init": "random"}
    assert config.train_document("m", "ia3", tmp_path)["method"] == {"name": "ia3"}


def test_yaml_settings_override_a_method_and_quick_shrinks_the_budget(tmp_path):
    config = study_config({"methods_settings": {"lora": {"lr": 1e-3, "method": {"r": 8}}}}, quick=True)
    lora = config.train_document("m", "lora", tmp_path)
    assert lora["lr"] == 1e-3 and lora["method"]["r"] == 8 and lora["method"]["alpha"] == 32
    assert (config.functions, config.max_steps, config.eval_loss) == (8, 5, False)
    assert METHOD_SETTINGS["lora"]["method"]["r"] == 16  # the table itself is untouched


@pytest.mark.parametrize("document, message", [
    ({"method": ["lora"]}, "unknown study config key 'method' (did you mean 'methods'?)"),
    ({"methods": ["base", "qlora"]}, "study: unknown method 'qlora' in 'methods'; choose from base, full"),
    ({"methods_settings": {"base": {"lr": 1}}}, "study: 'methods_settings' names 'base', which is not a trained"),
    ({"functions": 0}, "study: 'functions' must be a positive integer or null, got 0"),
])
def test_bad_settings_are_named(document, message):
    with pytest.raises(LeantuneError, match=re.escape(message)):
        study_config(document)


# -- data ----------------------------------------------------------------------------------------

def test_a_users_test_becomes_the_body_of_test_entry_point():
    assert reference_body("from m import double\ndef test_it():\n    assert double(2) == 4\n", "double") == \
        "    assert double(2) == 4\n"
    assert reference_body("assert double(1) == 2\nassert double(0) == 0\n", "double") == \
        "    assert double(1) == 2\n    assert double(0) == 0\n"


@pytest.mark.parametrize("record, message", [
    ({"code": "def f(x): return x", "test": "assert f(1) == 1"}, "a study record needs the non-empty strings code, test, entry_point"),
    ({"code": "def f(x) return x", "test": "assert f(1) == 1", "entry_point": "f"}, "'code' is not valid Python"),
    ({"code": "def g(x): return x", "test": "assert g(1) == 1", "entry_point": "f"},
     "'code' does not define the entry point 'f'"),
])
def test_bad_user_records_are_named_with_their_line(tmp_path, record, message):
    with pytest.raises(LeantuneError, match=re.escape(f"data file '{tmp_path}', line 3: {message}")):
        user_record(record, tmp_path, 3)


def test_a_user_jsonl_is_split_by_its_seed_and_failing_references_are_left_out(tmp_path, capsys):
    lines = [{"code": f"def f{i}(x):\n    return x + {i}\n", "entry_point": f"f{i}",
              "test": f"def test_f():\n    assert f{i}(1) == {1 + i}\n"} for i in range(8)]
    lines[5]["test"] = "assert f5(1) == 0\n"  # wrong on its own code
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = prepare_data(str(path), tmp_path / "out", None, split_seed=3, test_fraction=0.25)
    assert "1 of 8 reference tests do not pass on their own code" in capsys.readouterr().err
    train = [json.loads(line) for line in (tmp_path / "out/data/train.jsonl").read_text().splitlines()]
    assert len(data.held_out) == 2 and len(train) == 5
    assert {r["entry_point"] for r in data.held_out + train} == {f"f{i}" for i in range(8) if i != 5}
    again = prepare_data(str(path), tmp_path / "again", None, split_seed=3, test_fraction=0.25)
    assert [r["task_id"] for r in again.held_out] == [r["task_id"] for r in data.held_out]
    assert all(row["status"] == "pass" for row in judge_tests(data.held_out, [r["test"] for r in data.held_out]))


# -- the base row through its chat template ------------------------------------------------------

def test_a_chat_reply_gives_its_test_function_renamed_with_its_imports():
    reply = ("Here is a test:\n```python\nimport math\nfrom solution import double\n\n"
             "def test_doubles():\n    assert double(2) == 4\n\n    assert double(0) == 0\n\nprint('done')\n```\nDone.")
    assert extract_chat_test(RECORD, reply) == \
        "import math\ndef test_double():\n    assert double(2) == 4\n\n    assert double(0) == 0\n"
    rows = judge_tests([RECORD], [extract_chat_test(RECORD, reply)])
    assert rows[0]["status"] == "pass" and rows[0]["calls_function"]


def test_a_chat_reply_without_a_test_function_keeps_its_asserts_or_fails_to_parse():
    assert extract_chat_test(RECORD, "assert double(3) == 6\nx = 1\n") == "def test_double():\n    assert double(3) == 6\n"
    for reply in ("", "I cannot help with that."):
        assert judge_tests([RECORD], [extract_chat_test(RECORD, reply)])[0]["status"] == "syntax"


# -- findings ------------------------------------------------------------------------------------

def _row(key, method, passes, executable, coverage, share):
    def estimate(value, low=None, high=None):
        return {"value": value, "low": value - 0.05 if low is None else low, "high": value + 0.05 if high is None else high}
    return {"key": key, "method": method, "label": key, "share": share,
            "estimates": {"pass_with_call": estimate(passes), "line_coverage": estimate(coverage),
                          "mutation_score": estimate(0.2), "executable": estimate(executable),
                          "line_coverage_executable": estimate(coverage / max(executable, 1e-9))},
            **({"cost_efficiency": {"pass_with_call": (passes - 0.1) / share}} if method != "base" else {})}


def test_findings_say_what_holds_on_the_numbers():
    rows = [_row("base-chat", "base", 0.1, 0.9, 0.3, 0.0), _row("full", "full", 0.5, 0.6, 0.5, 1.0),
            _row("lora", "lora", 0.45, 0.5, 0.45, 0.01), _row("prompt", "prompt", 0.2, 0.8, 0.3, 0.0001)]
    verdict = {"verdict": "no measurable difference", "p_value": 0.5}
    columns = ("pass_with_call", "line_coverage", "mutation_score")
    compared = {key: {"base": {"pass_with_call": verdict}, "full": {c: verdict for c in columns}}
                for key in ("full", "lora", "prompt")}
    one, two, three = findings({"rows": rows, "reference_base": "base-chat", "comparisons": compared})
    assert one.startswith("1. LoRA close to full fine-tuning: **not contradicted** (full is ahead on pass_with_call")
    assert "pass+call 45.0% against 50.0%" in one
    assert two.startswith("2. Prompt tuning the most cost-effective: **not shown (the gain is not measurable)**")
    assert three.startswith("3. Fewer executable tests, but the executable ones cover more: **holds in point "
                            "estimates only**")
    compared["prompt"]["base"]["pass_with_call"] = {"verdict": "prompt is higher", "p_value": 0.01}
    assert "**holds**" in findings({"rows": rows, "reference_base": "base-chat", "comparisons": compared})[1]
    compared["lora"]["full"]["pass_with_call"] = {"verdict": "full is higher", "p_value": 0.01}
    assert "**does not hold** (full is higher on pass_with_call)" in findings(
        {"rows": rows, "reference_base": "base-chat", "comparisons": compared})[0]


# -- a tiny study end to end -----------------------------------------------------------------------

TINY = {"functions": 3, "max_steps": 2, "max_length": 320, "max_new_tokens": 16, "mutants": 3, "eval_loss": False,
        "models": ["tiny-llama"], "methods": ["base", "lora"]}


@pytest.mark.parametrize("change, sentence", [
    ({"methods_settings": {"lora": {"lrr": 1}}}, "study: the lora row's training config: unknown config key 'lrr'"),
    ({"methods_settings": {"lora": {"method": {"r": "x"}}}}, "study: the lora row's training config: .*'r' must be"),
    ({"max_length": 8}, "no example is left after fitting to max_length=8"),
])
def test_what_would_fail_a_row_fails_before_any_row_runs_and_an_earlier_study_stays(tmp_path, change, sentence):
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"config": study_config(TINY).to_dict()}))
    (out / "tiny-llama").mkdir()
    (out / "tiny-llama" / "kept").write_text("an earlier row")

    def no_row(spec):
        raise AssertionError(f"a row ran: {spec['method']}")

    with pytest.raises(LeantuneError, match=sentence):
        run_study(study_config({**TINY, **change}), out, overwrite=True, runner=no_row, progress=False)
    if "max_length" not in change:  # a config is checked before --overwrite clears OUT
        assert (out / "tiny-llama" / "kept").read_text() == "an earlier row"


def test_a_tiny_study_resumes_after_an_interruption_and_reports_every_row(tmp_path):
    out, calls = tmp_path / "study", []

    def stop_at_lora(spec):
        calls.append(spec["method"])
        return method_run.EXIT_INTERRUPTED if spec["method"] == "lora" else run_in_subprocess(spec)

    with pytest.raises(StudyInterrupted, match="tiny-llama/lora"):
        run_study(study_config(TINY), out, runner=stop_at_lora, progress=False)
    base_result = out / "tiny-llama/base/result.json"
    assert base_result.is_file() and not (out / "tiny-llama/lora/result.json").exists()
    written = base_result.stat().st_mtime_ns

    with pytest.raises(LeantuneError, match="holds an earlier study; pass --resume"):
        run_study(study_config(TINY), out, progress=False)
    with pytest.raises(LeantuneError, match=re.escape("--resume: 'functions' was 3 in the study")):
        run_study(study_config({**TINY, "functions": 2}), out, resume=True, progress=False)

    def record(spec):
        calls.append(spec["method"])
        return run_in_subprocess(spec)

    results = run_study(study_config(TINY), out, resume=True, runner=record, progress=False)
    assert calls == ["base", "lora", "lora"] and base_result.stat().st_mtime_ns == written
    block = results["models"]["tiny-llama"]
    assert [row["key"] for row in block["rows"]] == ["base-prompt", "base-chat", "lora"]
    lora = block["rows"][-1]
    assert lora["trainable"] > 0 and lora["train_seconds"] is not None and lora["peak_memory_bytes"] > 0
    assert len(lora["tests"]) == 3 and all(t["status"] in ("pass", "fail", "error", "timeout", "killed", "syntax")
                                           for t in lora["tests"])
    assert block["reference_base"] in ("base-prompt", "base-chat") and "lora" in block["comparisons"]
    text = (out / "results.md").read_text()
    assert "| Base (chat template) |" in text and "| LoRA |" in text and "### The paper's findings, here" in text
    assert json.loads((out / "results.json").read_text())["failed"] == []


def test_the_command_refuses_contradictions_and_unknown_rows_in_one_line(tmp_path, capsys):
    assert main(["study", "unit-tests", "--out", str(tmp_path), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite contradict each other" in capsys.readouterr().err
    assert main(["study", "unit-tests", "--out", str(tmp_path), "--methods", "base,loraa"]) == 2
    assert "study: unknown method 'loraa' in 'methods'" in capsys.readouterr().err
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["study", "unit-tests", "--out", str(tmp_path), "--methods", "base"]) == 2
    assert "is not empty and holds no study" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
