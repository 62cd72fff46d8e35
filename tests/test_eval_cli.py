import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import leantune as lt
from conftest import randomize_adapter
from helpers import assert_one_line_user_error
from leantune.cli import main
from leantune.data.formats import IGNORE_INDEX, Example
from leantune.eval.generation import generate
from leantune.eval.metrics import loss_and_perplexity

PAIRS = [
    {"prompt": "def add(a, b):\n    return a + b\n\ndef test_add():\n", "completion": "    assert add(1, 2) == 3\n"},
    {"prompt": "# square\n", "completion": "def sq(x):\n    return x * x\n"},
    {"prompt": "x = ", "completion": "42"},
]


def random_examples(n=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=generator))
        prompt = int(torch.randint(1, length - 2, (1,), generator=generator))
        ids = torch.randint(0, 256, (length,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def reference_loss(model, examples):
    """Each example alone, full logits in float64: summed token losses over all labelled tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(torch.tensor([example.input_ids])).logits[0, :-1].double()
            targets = torch.tensor(example.labels[1:])
            total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    return total / count, count


def test_loss_and_perplexity_match_a_per_example_reference(tiny_llama):
    lt.attach(tiny_llama, lt.LoRA(r=4))
    randomize_adapter(tiny_llama)
    examples = random_examples()
    expected, count = reference_loss(tiny_llama, examples)
    tiny_llama.train()
    result = loss_and_perplexity(tiny_llama, examples, pad_id=257, batch_size=2)
    assert tiny_llama.training
    assert result["tokens"] == count and result["examples"] == len(examples)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    with pytest.raises(lt.LeantuneError, match="empty"):
        loss_and_perplexity(tiny_llama, [], pad_id=257)


@pytest.fixture
def adapter_dir(tmp_path, tiny_llama):
    torch.manual_seed(0)  # the same adapter whichever tests ran before (the stop test needs a long continuation)
    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8))
    randomize_adapter(tiny_llama, scale=0.2)
    return lt.save_adapter(tiny_llama, tmp_path / "adapter")


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def adapted_model(adapter_dir):
    return lt.load_adapter(lt.load_model("tiny-llama"), adapter_dir).eval()


def test_eval_reports_the_loss_of_the_adapted_model(adapter_dir, pairs_file, capsys):
    assert main(["eval", "--adapter", str(adapter_dir), "--data", str(pairs_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    from leantune.data import prepare_dataset

    examples, _ = prepare_dataset(str(pairs_file), lt.load_tokenizer("tiny-llama"), 512)
    expected, count = reference_loss(adapted_model(adapter_dir), examples)
    assert result["model"] == "tiny-llama" and result["tokens"] == count
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # the base model alone scores differently; plain-text output names the data
    assert main(["eval", "--model", "tiny-llama", "--data", str(pairs_file)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{pairs_file}: loss ") and "perplexity" in line
    assert f"{result['loss']:.4f}" not in line


def test_eval_on_the_built_in_held_out_split(adapter_dir, capsys):
    assert main(["eval", "--adapter", str(adapter_dir), "--max-length", "2048", "--batch-size", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"] == "humaneval-tests:test" and result["examples"] == 40
    from leantune.data import prepare_dataset

    examples, _ = prepare_dataset("humaneval-tests:test", lt.load_tokenizer("tiny-llama"), 2048)
    expected, count = reference_loss(adapted_model(adapter_dir), examples)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_generate_one_prompt_and_a_prompts_file(adapter_dir, pairs_file, tmp_path, capsys):
    model, tokenizer = adapted_model(adapter_dir), lt.load_tokenizer("tiny-llama")
    prompts = [p["prompt"] for p in PAIRS]
    expected = generate(model, tokenizer, prompts, max_new_tokens=8)
    assert main(["generate", "--adapter", str(adapter_dir), "--prompt", prompts[0], "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"

    assert main(["generate", "--adapter", str(adapter_dir), "--prompts", str(pairs_file), "--max-new-tokens", "8"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"prompt": p, "generation": g} for p, g in zip(prompts, expected)]

    out = tmp_path / "out.jsonl"
    stop = expected[1][2:4]
    assert main(["generate", "--adapter", str(adapter_dir), "--prompts", str(pairs_file), "--max-new-tokens", "8",
                 "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "--output", str(out)]) == 0
    sampled = generate(model, tokenizer, prompts, max_new_tokens=8, temperature=0.7, top_p=0.9, seed=3)
    assert [json.loads(line)["generation"] for line in out.read_text().splitlines()] == sampled

    escaped = stop.encode("unicode_escape").decode("ascii")
    assert main(["generate", "--adapter", str(adapter_dir), "--prompt", prompts[1], "--max-new-tokens", "8",
                 "--stop", escaped]) == 0
    assert capsys.readouterr().out == expected[1][:expected[1].find(stop)] + "\n"


@pytest.mark.parametrize("verb", ["eval", "generate"])
def test_missing_adapter_is_a_user_error(verb, tmp_path, capsys):
    extra = ["--prompt", "x"] if verb == "generate" else []
    assert main([verb, "--adapter", str(tmp_path / "nope"), *extra]) == 2
    assert_one_line_user_error(capsys.readouterr().err, verb, re.escape(f"adapter directory '{tmp_path}/nope' does not exist"))
    assert main([verb, *extra]) == 2
    assert_one_line_user_error(capsys.readouterr().err, verb,
                               r"name what to run: --adapter DIR \(a saved adapter\) and/or --model NAME")


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": \n', r"{path}, line 2: not valid JSON \(Expecting value at column 1\)"),
    ('{"text": "a"}\n', r"{path}, line 1: expected a string under the key 'prompt'"),
    ("", r"prompts file '{path}' holds no records"),
])
def test_bad_prompts_file_is_a_user_error(adapter_dir, tmp_path, capsys, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    assert main(["generate", "--adapter", str(adapter_dir), "--prompts", str(path)]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "generate", message.format(path=re.escape(str(path))))


def test_bad_eval_data_is_a_user_error(adapter_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    assert main(["eval", "--adapter", str(adapter_dir), "--data", str(path)]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "eval",
                               re.escape(f"{path}, line 2: not valid JSON (Expecting value at column 1)"))
    assert main(["eval", "--adapter", str(adapter_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "eval",
                               re.escape(f"data file '{tmp_path}/missing.jsonl' does not exist (built-in datasets: ")
                               + r"humaneval-tests.*\)")


# -- the command's start-up and output --------------------------------------------------------

def _python(code, *args):
    """Run `code` in a fresh interpreter that imports this checkout's leantune."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_help_of_every_verb_imports_no_torch():
    done = _python(
        "import sys\nfrom leantune.cli import VERBS, main\n"
        "for argv in [['--help']] + [[verb, '--help'] for verb in VERBS]:\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted({'torch', 'transformers', 'bitsandbytes', 'peft', 'numpy', 'safetensors'} & set(sys.modules)))\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    done = _python("import runpy, sys; sys.argv = ['leantune', 'eval', '--help']; "
                   "runpy.run_module('leantune', run_name='__main__')")
    assert done.returncode == 0 and done.stdout.startswith("usage: leantune eval")


def test_a_command_prints_no_library_noise(tmp_path):
    folder = tmp_path / "model"
    lt.load_model("tiny-llama").save_pretrained(folder)
    lt.load_tokenizer("tiny-llama").save_pretrained(folder)
    done = _python("import sys\nfrom leantune.cli import main\n"
                   "status = main(['generate', '--model', sys.argv[1], '--prompt', 'def f', '--max-new-tokens', '2'])\n"
                   "print(sorted({'bitsandbytes', 'peft'} & set(sys.modules)))\nsys.exit(status)\n", str(folder))
    assert done.returncode == 0
    assert done.stdout.splitlines()[-1] == "[]"
    assert "Loading weights" not in done.stderr and "gemm_4bit_forward" not in done.stderr
    assert done.stderr == ""


def test_a_directory_as_prompts_file_or_train_config_is_named_a_directory(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompts", str(tmp_path)]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "generate",
                               re.escape(f"prompts file '{tmp_path}' is a directory; expected a .jsonl file of "
                                         '{"prompt": ...} records'))
    assert main(["train", str(tmp_path)]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "train",
                               re.escape(f"config file '{tmp_path}' is a directory; expected a YAML file"))
