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


def test_freezes_nothing_even_after_a_frozen_start(tiny_llama, tokens):
    for param in tiny_llama.parameters():
        param.requires_grad_(False)
    lt.attach(tiny_llama, lt.Full())
    assert all(p.requires_grad for p in tiny_llama.parameters())
    # every weight gets the gradient plain autograd gives an untouched copy of the model
    reference = lt.load_model("tiny-llama")
    tiny_llama(tokens, labels=tokens).loss.backward()
    reference(tokens, labels=tokens).loss.backward()
    expected = dict(reference.named_parameters())
    for name, param in tiny_llama.named_parameters():
        assert torch.count_nonzero(param.grad) > 0, name
        torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_saved_adapter_stores_full_weights_once_and_loads_them_tied(tiny_llama, tmp_path, tokens):
    from safetensors.torch import load_file

    lt.attach(tiny_llama, lt.Full())
    randomize_adapter(tiny_llama, scale=0.05)  # trained weights, unlike a fresh model's
    lt.save_adapter(tiny_llama, tmp_path / "full")
    saved = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved  # tied: stored once
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in tiny_llama.parameters())
    state = tiny_llama.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(tensor, state[key]), key
    fresh = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "full")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    torch.testing.assert_close(fresh.lm_head.weight, tiny_llama.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(fresh(tokens).logits, tiny_llama(tokens).logits, rtol=0, atol=0)
    assert not torch.allclose(fresh(tokens).logits, lt.load_model("tiny-llama")(tokens).logits)


def test_disabled_without_a_copy_of_the_base_is_an_error(tiny_llama):
    lt.attach(tiny_llama, lt.Full())
    with pytest.raises(lt.LeantuneError, match=r"keep_base=True"):
        with lt.disabled(tiny_llama):
            pass


def test_keep_base_swaps_tied_weights_without_untying_them(tiny_llama, tokens):
    base_logits = tiny_llama(tokens).logits.detach()
    base_embedding = tiny_llama.model.embed_tokens.weight.detach().clone()
    lt.attach(tiny_llama, lt.Full(keep_base=True))
    randomize_adapter(tiny_llama, scale=0.05)
    trained_logits = tiny_llama(tokens).logits.detach()
    trained_embedding = tiny_llama.model.embed_tokens.weight.detach().clone()
    assert not torch.allclose(trained_logits, base_logits)
    with lt.disabled(tiny_llama):
        assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
        assert torch.equal(tiny_llama.lm_head.weight, base_embedding)
        torch.testing.assert_close(tiny_llama(tokens).logits, base_logits, rtol=0, atol=0)
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    assert torch.equal(tiny_llama.lm_head.weight, trained_embedding)
    torch.testing.assert_close(tiny_llama(tokens).logits, trained_logits, rtol=0, atol=0)


def test_detach_frees_the_copy_of_the_base_and_keeps_the_trained_weights(tiny_llama, tokens):
    lt.attach(tiny_llama, lt.Full(keep_base=True))
    copies = tiny_llama.__dict__["leantune_full_base"]["default"]["tensors"]
    state = tiny_llama.state_dict()
    assert copies.keys() == {k for k in state if k != "lm_head.weight"}  # the tied head once
    assert all(torch.equal(copies[k], state[k]) for k in copies)
    randomize_adapter(tiny_llama, scale=0.05)
    trained = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    trained_logits = tiny_llama(tokens).logits.detach()
    lt.detach(tiny_llama)
    assert tiny_llama.__dict__.get("leantune_full_base", {}) == {}
    for key, value in tiny_llama.state_dict().items():
        assert torch.equal(value, trained[key]), key
    torch.testing.assert_close(tiny_llama(tokens).logits, trained_logits, rtol=0, atol=0)


def test_loading_weights_of_another_shape_names_the_tensor(tmp_path):
    model = lt.load_model("tiny-llama", vocab_size=600)
    lt.attach(model, lt.Full())
    lt.save_adapter(model, tmp_path / "big-vocab")
    with pytest.raises(lt.LeantuneError, match=r"'model\.embed_tokens\.weight' has shape \(600, 64\), the model expects \(512, 64\)"):
        lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "big-vocab")


def test_bad_config_value_names_the_key():
    with pytest.raises(lt.LeantuneError, match="'keep_base'"):
        lt.Full(keep_base=1)
