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


def test_saved_adapter_stores_full_weights_once_and_loads_them_tied(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    lt.attach(tiny_llama, lt.Full())
    lt.save_adapter(tiny_llama, tmp_path / "full")
    saved = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved  # tied: stored once
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in tiny_llama.parameters())
    fresh = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "full")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def test_disabled_without_a_copy_of_the_base_is_an_error(tiny_llama):
    lt.attach(tiny_llama, lt.Full())
    with pytest.raises(lt.LeantuneError, match=r"keep_base=True"):
        with lt.disabled(tiny_llama):
            pass


def test_keep_base_swaps_tied_weights_without_untying_them(tiny_llama):
    lt.attach(tiny_llama, lt.Full(keep_base=True))
    randomize_adapter(tiny_llama, scale=0.05)
    with lt.disabled(tiny_llama):
        assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight


def test_detach_frees_the_copy_of_the_base(tiny_llama):
    lt.attach(tiny_llama, lt.Full(keep_base=True))
    assert tiny_llama.__dict__["leantune_full_base"]
    lt.detach(tiny_llama)
    assert tiny_llama.__dict__.get("leantune_full_base", {}) == {}


def test_loading_weights_of_another_shape_names_the_tensor(tmp_path):
    model = lt.load_model("tiny-llama", vocab_size=600)
    lt.attach(model, lt.Full())
    lt.save_adapter(model, tmp_path / "big-vocab")
    with pytest.raises(lt.LeantuneError, match=r"'model\.embed_tokens\.weight' has shape \(600, 64\), the model expects \(512, 64\)"):
        lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "big-vocab")


def test_bad_config_value_names_the_key():
    with pytest.raises(lt.LeantuneError, match="'keep_base'"):
        lt.Full(keep_base=1)
