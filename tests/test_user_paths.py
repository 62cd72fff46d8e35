"""Mistakes on the way in and out of the CLI: bad paths and options are one-line user errors found
before any work, and nothing the user had is damaged; GPT-2's PEFT export loads in the real PEFT."""
import json
import re

import peft  # a test dependency (the dev extra)
import pytest
import torch
import transformers as tf

import leantune as lt
from conftest import randomize_adapter
from helpers import assert_one_line_user_error
from leantune.cli import main
from leantune.eval.generation import generate

PROMPTS = [{"prompt": "def add(a, b):"}, {"prompt": "x = "}]
PAIRS = [{"prompt": "x = ", "completion": "42"}]


@pytest.fixture
def adapter_dir(tmp_path, tiny_llama):
    lt.attach(tiny_llama, lt.LoRA(r=4))
    randomize_adapter(tiny_llama)
    return lt.save_adapter(tiny_llama, tmp_path / "run" / "adapter")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    lt.load_model("tiny-llama").save_pretrained(folder)
    lt.load_tokenizer("tiny-llama").save_pretrained(folder)
    return folder


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- PEFT export of a model whose class is not *ForCausalLM -----------------------------------

@pytest.mark.parametrize("config", [lt.PromptTuning(num_virtual_tokens=5), lt.PrefixTuning(num_virtual_tokens=5)],
                         ids=["prompt", "prefix"])
def test_gpt2_prompt_learning_export_loads_in_peft_with_the_same_logits(config, tmp_path):
    torch.manual_seed(1)
    gpt2 = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=256)
    tf.AutoModelForCausalLM.from_config(gpt2).save_pretrained(tmp_path / "gpt2")
    model = lt.load_model(str(tmp_path / "gpt2"))
    lt.attach(model, config)
    randomize_adapter(model, scale=0.3)
    lt.export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"

    loaded = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"),
                                            tmp_path / "peft").eval()
    tokens = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(tokens).logits
        got = loaded(input_ids=tokens).logits[:, -tokens.shape[1]:]  # prompt tuning's logits include its virtual tokens
        with lt.disabled(model):
            base = model(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-2  # the adapter acts, so the match above is not base = base


# -- export must not destroy the adapter it reads ---------------------------------------------

@pytest.mark.parametrize("where, relation", [("adapter", "is"), ("", "contains"), ("adapter/peft", "lies inside")])
def test_export_out_overlapping_the_adapter_is_refused_and_the_adapter_kept(adapter_dir, where, relation, capsys):
    before = _files(adapter_dir)
    out = adapter_dir.parent / where
    assert main(["export", "--adapter", str(adapter_dir), "--out", str(out), "--format", "merged", "--force"]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "export", re.escape(
        f"--out '{out}' {relation} --adapter '{adapter_dir}'; choose an --out outside the adapter"))
    assert _files(adapter_dir) == before


# -- output paths that cannot be written ------------------------------------------------------

def test_generate_output_that_is_a_directory_or_under_a_file_is_refused_before_generating(
        adapter_dir, prompts_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("leantune.eval.generation.generate",
                        lambda *args, **kwargs: pytest.fail("generated before checking --output"))
    command = ["generate", "--adapter", str(adapter_dir), "--prompts", str(prompts_file), "--output"]
    assert main([*command, str(tmp_path)]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "generate",
                               re.escape(f"cannot write file '{tmp_path}': it is a directory; name a file in it instead"))
    assert main([*command, str(prompts_file / "out.jsonl")]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "generate", re.escape(
        f"cannot write '{prompts_file}/out.jsonl': '{prompts_file}' is a file, not a directory"))


def test_export_out_under_a_file_is_refused(adapter_dir, prompts_file, capsys):
    out = prompts_file / "peft"
    assert main(["export", "--adapter", str(adapter_dir), "--out", str(out)]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "export",
                               re.escape(f"cannot write '{out}': '{prompts_file}' is a file, not a directory"))


def test_eval_adapter_that_is_a_file_says_so(prompts_file, pairs_file, capsys):
    assert main(["eval", "--adapter", str(prompts_file), "--data", str(pairs_file)]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "eval", re.escape(
        f"adapter '{prompts_file}' is a file, not a directory; pass the adapter directory"))


# -- broken model folders ---------------------------------------------------------------------

def test_corrupt_model_weights_name_the_file(model_folder, pairs_file, capsys):
    weights = model_folder / "model.safetensors"
    weights.write_bytes(b"\xff" * 64)
    assert main(["eval", "--model", str(model_folder), "--data", str(pairs_file)]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "eval",
                               re.escape(f"cannot load model '{model_folder}': '{weights}' is not a valid safetensors file (")
                               + r".*\)")


def test_broken_model_config_names_the_config_not_the_tokenizer(model_folder, pairs_file, capsys):
    config = model_folder / "config.json"
    config.write_text("{oops")
    assert main(["eval", "--model", str(model_folder), "--data", str(pairs_file)]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "eval", re.escape(f"'{config}' is not valid JSON: ") + ".*")


# -- sampling options -------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    ({"temperature": 1.0, "top_p": float("nan")}, "top_p must be in (0, 1], got nan"),
])
def test_non_finite_sampling_options_are_refused(tiny_llama, options, message):
    with pytest.raises(lt.LeantuneError, match=re.escape(message)):
        generate(tiny_llama, lt.load_tokenizer("tiny-llama"), ["x = "], max_new_tokens=2, **options)


def test_non_finite_temperature_is_a_cli_user_error(adapter_dir, capsys):
    assert main(["generate", "--adapter", str(adapter_dir), "--prompt", "hi", "--temperature", "nan"]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "generate",
                               re.escape("temperature must be a finite number >= 0 (0 = greedy), got nan"))


# -- sequences longer than a model's learned positions ------------------------------------------

@pytest.fixture
def gpt2_folder(tmp_path):
    folder = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512, n_positions=24)).save_pretrained(folder)
    lt.load_tokenizer("tiny-llama").save_pretrained(folder)
    return folder


def test_sequences_past_learned_positions_are_refused_before_any_work_and_the_last_run_is_kept(
        gpt2_folder, tmp_path, capsys):
    """GPT-2's position table has n_positions rows: a longer sequence was an IndexError traceback deep in
    the forward, after --overwrite had cleared the previous run's adapter."""
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "ab", "completion": "cdefgh"}) + "\n"
                    + json.dumps({"prompt": "a b c d e f g h i j k l m n o p", "completion": "q r s t u v w x y z"}) + "\n")
    run = ["train", "--set", f"model={gpt2_folder}", "--set", "method={name: lora, r: 2, targets: [c_attn]}",
           "--set", "max_steps=1", "--set", "unit_test_table=false", "--set", "progress=false",
           "--set", f"out_dir={tmp_path / 'out'}", "--set", "data.eval=null"]
    assert main([*run, "--set", f"data.train={long}", "--set", "max_length=20"]) == 0
    kept = _files(tmp_path / "out" / "adapter")
    capsys.readouterr()
    assert main([*run, "--overwrite", "--set", f"data.train={long}", "--set", "max_length=64"]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "train", r"the longest example is \d+ tokens, but this model "
                               r"has learned positions for 24 only; lower max_length")
    assert _files(tmp_path / "out" / "adapter") == kept
    assert main(["eval", "--model", str(gpt2_folder), "--data", str(long), "--max-length", "64"]) == 2
    assert "learned positions for 24 only" in capsys.readouterr().err
    assert main(["generate", "--model", str(gpt2_folder), "--prompt", "hi", "--max-new-tokens", "30"]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "generate", r"the longest prompt with max_new_tokens is \d+ tokens, but "
                               r"this model has learned positions for 24 only; shorten the prompt or lower max_new_tokens")


def test_virtual_tokens_count_against_learned_positions_and_packed_rows_by_their_examples(gpt2_folder, tmp_path):
    """Prompt tuning's virtual tokens take positions too (an IndexError with examples that fit alone);
    a packed row needs the positions of its longest example, not its own length."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "ab", "completion": "cdefgh"}) + "\n" for _ in range(6)))
    base = {"model": str(gpt2_folder), "max_steps": 1, "unit_test_table": False, "progress": False,
            "data": {"train": str(pairs), "eval": None}, "max_length": 24}
    prompt = dict(base, method={"name": "prompt", "num_virtual_tokens": 20}, out_dir=str(tmp_path / "prompt"))
    with pytest.raises(lt.LeantuneError, match=r"the longest example is \d+ tokens plus the adapter's 20 virtual "
                                               r"tokens, but this model has learned positions for 24 only"):
        lt.train(prompt)
    model = lt.load_model(str(gpt2_folder))
    lt.attach(model, lt.PromptTuning(num_virtual_tokens=20))
    with pytest.raises(lt.LeantuneError, match="plus the adapter's 20 virtual tokens"):
        generate(model, lt.load_tokenizer(str(gpt2_folder)), ["ab"], max_new_tokens=4)
    packed = dict(base, method={"name": "lora", "r": 2, "targets": ["c_attn"]}, packing=True, max_length=48,
                  out_dir=str(tmp_path / "packed"))
    assert lt.train(packed).steps == 1  # rows of up to 48 tokens whose examples need about 10 positions each
