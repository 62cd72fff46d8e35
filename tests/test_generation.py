import pytest
import torch

import leantune as lt
from conftest import randomize_adapter
from helpers import sharp_model
from leantune.eval.generation import cut_at_stop, end_token_ids, generate
from leantune.eval.sandbox import Limits
from leantune.studies import unit_tests

PROMPTS = ["def f(x):\n    return x", "hi", "a longer prompt with several more words in it", "assert 1"]


@pytest.fixture
def model():
    return sharp_model()


@pytest.fixture
def tokenizer():
    return lt.load_tokenizer("tiny-llama")


def reference_greedy(model, tokenizer, prompt, max_new_tokens):
    """One prompt, no padding, no cache: the full forward pass at every step, argmax."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    new = []
    end = set(end_token_ids(tokenizer))
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(ids).logits[0, -1].argmax())
            new.append(token)
            if token in end:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_greedy_matches_unbatched_reference(model, tokenizer):
    expected = [reference_greedy(model, tokenizer, p, 12) for p in PROMPTS]
    assert len(set(expected)) == len(expected)
    for batch_size in (3, 4):
        assert generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=batch_size) == expected


def test_adapters_take_part_and_disabled_gives_the_base(model, tokenizer):
    base = [reference_greedy(model, tokenizer, p, 10) for p in PROMPTS]
    lt.attach(model, lt.LoRA(r=4, alpha=8))
    randomize_adapter(model, scale=0.3)
    model.train()
    tuned = [reference_greedy(model.eval(), tokenizer, p, 10) for p in PROMPTS]
    model.train()
    assert tuned != base
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2) == tuned
    assert model.training  # the caller's mode comes back
    with lt.disabled(model):
        assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=2) == base


def test_stop_strings_cut_the_text_and_end_the_row_early(model, tokenizer):
    full = generate(model, tokenizer, PROMPTS, max_new_tokens=20)
    # an ASCII character a few tokens in (multi-byte characters decode differently in pieces)
    row, stop = next((row, c) for row, text in enumerate(full) for c in text[3:] if c.isascii() and c.isprintable())
    first = full[row].find(stop)
    stats = {}
    cut = generate(model, tokenizer, [PROMPTS[row]], max_new_tokens=20, stop=["never", stop], stats=stats)[0]
    assert cut == full[row][:first]
    assert stats["new_tokens"] < 20 and stats["hit_budget"] == [False]
    generate(model, tokenizer, PROMPTS, max_new_tokens=2, stats=stats)
    assert stats["hit_budget"] == [True] * len(PROMPTS) and stats["new_tokens"] == 2 * len(PROMPTS)
    assert cut_at_stop("abcXdefYg", ["Y", "X"]) == "abc"
    assert cut_at_stop("abc", ["Z"]) == "abc"


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, PROMPTS, max_new_tokens=8)
    sampled = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.5, seed=1)
    assert sampled == generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.5, seed=1)
    assert sampled != greedy
    assert sampled != generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.5, seed=2)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6) == greedy
    state = torch.random.get_rng_state()
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=4, temperature=1.0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone


def test_long_prompts_keep_their_end(model, tokenizer):
    long_prompt = "x" * 50 + PROMPTS[0]
    assert (generate(model, tokenizer, [long_prompt], max_new_tokens=6, max_prompt_tokens=len(PROMPTS[0]))
            == generate(model, tokenizer, PROMPTS[:1], max_new_tokens=6))


@pytest.mark.parametrize("options, message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_options_are_user_errors(model, tokenizer, options, message):
    with pytest.raises(lt.LeantuneError, match=message):
        generate(model, tokenizer, PROMPTS, **options)
    with pytest.raises(lt.LeantuneError, match="list of prompts"):
        generate(model, tokenizer, "one string")


def test_an_empty_prompt_is_a_user_error_naming_it(model, tokenizer):
    with pytest.raises(lt.LeantuneError, match="^prompt 3 of 4 is empty; every prompt needs some text to continue$"):
        generate(model, tokenizer, ["hi", "def f", "", "x"])
    with pytest.raises(lt.LeantuneError, match="^prompt 1 of 1 is empty"):
        generate(model, tokenizer, [""])


def test_the_command_refuses_an_empty_prompt_or_prompts_line(tmp_path, capsys):
    from leantune.cli import main

    assert main(["generate", "--model", "tiny-llama", "--prompt", ""]) == 2
    err = capsys.readouterr().err
    assert err == "leantune generate: error: --prompt is empty; give the model some text to continue\n"
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "def f"}\n\n{"prompt": ""}\n')
    assert main(["generate", "--model", "tiny-llama", "--prompts", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"leantune generate: error: {path}, line 3: the prompt is empty; give the model some text to continue\n"
    assert "Traceback" not in err


# -- judging generated tests --------------------------------------------------------------------

RECORD = {"task_id": "Demo/0", "entry_point": "add",
          "function": "def add(a, b):\n    return a + b\n"}


def test_extract_test_stops_at_the_first_unindented_line():
    generated = "    assert add(1, 2) == 3\n\n    assert add(0, 0) == 0\n\nprint('done')\n    assert False\n"
    assert unit_tests.extract_test(RECORD, generated) == (
        "def test_add():\n    assert add(1, 2) == 3\n\n    assert add(0, 0) == 0\n")
    assert unit_tests.extract_test(RECORD, "x = 1\n") == "def test_add():\n"
    cut_by_budget = "    assert add(1, 2) == 3\n    assert add(2,"
    assert unit_tests.extract_test(RECORD, cut_by_budget, hit_budget=True) == (
        "def test_add():\n    assert add(1, 2) == 3\n")
    assert unit_tests.extract_test(RECORD, cut_by_budget) == "def test_add():\n" + cut_by_budget + "\n"
    assert unit_tests.extract_test(RECORD, "    assert add(1, 2) == 3\n    pass\n", hit_budget=True).endswith("pass\n")


def test_judge_tells_every_outcome_apart():
    bodies = {
        "pass": "    assert add(1, 2) == 3\n",
        "fail": "    assert add(1, 2) == 4\n",
        "error": "    assert add(1) == 1\n",
        "timeout": "    while add(1, 1):\n        pass\n",
        "syntax": "    assert add(1, 2 == 3\n",
        "trivial": "    assert True\n",
    }
    tests = [unit_tests.extract_test(RECORD, body) for body in bodies.values()]
    rows = unit_tests.judge_tests([RECORD] * len(tests), tests, Limits(wall_seconds=4, cpu_seconds=1))
    assert [row["status"] for row in rows] == ["pass", "fail", "error", "timeout", "syntax", "pass"]
    assert [row["calls_function"] for row in rows] == [True, True, True, True, False, False]
    summary = unit_tests.summarize(rows)
    assert summary["counts"] == {"pass": 2, "fail": 1, "error": 1, "timeout": 1, "killed": 0, "syntax": 1}
    assert summary["parse_rate"] == pytest.approx(5 / 6)
    assert summary["pass_rate"] == pytest.approx(2 / 6)
    assert summary["pass_with_call_rate"] == pytest.approx(1 / 6)


def test_before_after_uses_the_base_then_the_tuned_model(model, tokenizer):
    records = [dict(RECORD, prompt="def add(a, b):\n    return a + b\n\ndef test_add():\n"),
               dict(RECORD, task_id="Demo/1", prompt="# add two numbers\ndef test_add():\n")]
    lt.attach(model, lt.LoRA(r=4, alpha=8))
    randomize_adapter(model, scale=0.3)
    result = unit_tests.before_after(model, tokenizer, records, max_new_tokens=16, eval_loss_before=2.0,
                                     eval_loss_after=1.5, progress=False, print_table=False)
    prompts = [r["prompt"] for r in records]
    stop = unit_tests.END_OF_FUNCTION
    tuned = generate(model, tokenizer, prompts, max_new_tokens=16, stop=stop)
    with lt.disabled(model):
        base = generate(model, tokenizer, prompts, max_new_tokens=16, stop=stop)
    assert [row["generated"] for row in result["base"]["rows"]] == base
    assert [row["generated"] for row in result["tuned"]["rows"]] == tuned
    assert base != tuned
    for label, loss in (("base", 2.0), ("tuned", 1.5)):
        summary = result[label]
        assert summary["eval_loss"] == loss and summary["n"] == 2
        assert sum(summary["counts"].values()) == 2
    lines = result["table"].splitlines()
    assert lines[1].split()[:2] == ["base", "2.0000"] and lines[2].split()[:2] == ["tuned", "1.5000"]


def test_rendered_chat_prompts_are_encoded_without_a_second_bos():
    """special_tokens=False (the study's chat-template base row): the template wrote BOS already."""
    from helpers import bos_adding_tokenizer
    from leantune.eval.generation import _encode_batch

    tokenizer, bos = bos_adding_tokenizer()
    rendered = "<s>" + "hello"
    assert _encode_batch(tokenizer, [rendered], None)["input_ids"][0].tolist().count(bos) == 2
    ids = _encode_batch(tokenizer, [rendered], None, special_tokens=False)["input_ids"][0].tolist()
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"] and ids.count(bos) == 1
