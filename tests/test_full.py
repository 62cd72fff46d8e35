import pytest
import torch

import leantune as lt
from conftest import TwoLayer, randomize_adapter


def test_every_parameter_trains_and_gradients_match_plain_autograd():
    torch.manual_seed(0)
    reference = TwoLayer().double()
    model = TwoLayer().double()
    model.load_state_dict(reference.state_dict())
    lt.attach(model, lt.Full())
    assert all(p.requires_grad for p in model.parameters())
    x = torch.randn(4, 16, dtype=torch.float64)
    out, expected = model(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref.grad, msg=name)
    info = lt.summary(model)
    assert info["trainable"] == info["total"] == sum(p.numel() for p in model.parameters())


def test_freezes_nothing_even_after_a_frozen_start(tiny_llama):
    for param in tiny_llama.parameters():
        param.requires_grad_(False)
    lt.attach(tiny_llama, lt.Full())
    assert all(p.requires_grad for p in tiny_llama.parameters())


def test_save_load_round_trip_stores_full_weights_once(tiny_llama, tokens, tmp_path):
    from safetensors.torch import load_file

    lt.attach(tiny_llama, lt.Full())
    randomize_adapter(tiny_llama, scale=0.05)
    expected = tiny_llama(tokens).logits
    lt.save_adapter(tiny_llama, tmp_path / "full")
    saved = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved  # tied: stored once
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in tiny_llama.parameters())
    fresh = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "full")
    torch.testing.assert_close(fresh(tokens).logits, expected, rtol=0, atol=0)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def test_merge_is_a_no_op_and_disabled_without_a_copy_is_an_error(tiny_llama, tokens):
    lt.attach(tiny_llama, lt.Full())
    randomize_adapter(tiny_llama, scale=0.05)
    trained = tiny_llama(tokens).logits
    lt.merge(tiny_llama)
    lt.unmerge(tiny_llama)
    torch.testing.assert_close(tiny_llama(tokens).logits, trained, rtol=0, atol=0)
    with pytest.raises(lt.LeantuneError, match=r"keep_base=True"):
        with lt.disabled(tiny_llama):
            pass


def test_keep_base_gives_the_exact_base_model_inside_disabled(tiny_llama, tokens):
    base_logits = tiny_llama(tokens).logits
    lt.attach(tiny_llama, lt.Full(keep_base=True))
    randomize_adapter(tiny_llama, scale=0.05)
    trained = tiny_llama(tokens).logits
    assert not torch.allclose(trained, base_logits, atol=1e-4)
    with lt.disabled(tiny_llama):
        torch.testing.assert_close(tiny_llama(tokens).logits, base_logits, rtol=0, atol=0)
        with lt.disabled(tiny_llama):  # nested: still the base
            torch.testing.assert_close(tiny_llama(tokens).logits, base_logits, rtol=0, atol=0)
    torch.testing.assert_close(tiny_llama(tokens).logits, trained, rtol=0, atol=0)
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight


def test_detach_keeps_the_trained_weights(tiny_llama, tokens):
    lt.attach(tiny_llama, lt.Full(keep_base=True))
    randomize_adapter(tiny_llama, scale=0.05)
    trained = tiny_llama(tokens).logits
    lt.detach(tiny_llama)
    assert lt.attached(tiny_llama) == {}
    assert tiny_llama.__dict__.get("leantune_full_base", {}) == {}  # the copy is freed
    torch.testing.assert_close(tiny_llama(tokens).logits, trained, rtol=0, atol=0)


def test_loading_weights_of_another_shape_names_the_tensor(tmp_path):
    model = lt.load_model("tiny-llama", vocab_size=600)
    lt.attach(model, lt.Full())
    lt.save_adapter(model, tmp_path / "big-vocab")
    with pytest.raises(lt.LeantuneError, match=r"'model\.embed_tokens\.weight' has shape \(600, 64\), the model expects \(512, 64\)"):
        lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "big-vocab")


def test_bad_config_value_names_the_key():
    with pytest.raises(lt.LeantuneError, match="'keep_base'"):
        lt.Full(keep_base=1)
