import pytest
import torch
import torch.nn.functional as F

import leantune as lt
from conftest import TwoLayer, randomize_adapter
from helpers import assert_matches_reference
from leantune.methods.bitfit import BitFitLayer


@pytest.fixture
def tiny_qwen2():
    return lt.load_model("tiny-qwen2")


def test_forward_and_gradients_match_reference():
    torch.manual_seed(0)
    model = TwoLayer().double()
    lt.attach(model, lt.BitFit())
    randomize_adapter(model, scale=0.3)
    up_bias = (model.up.bias + model.up.bias_delta).detach().clone().requires_grad_(True)
    down_bias = (model.down.bias + model.down.bias_delta).detach().clone().requires_grad_(True)

    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    out = model(x)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = F.linear(torch.relu(F.linear(x_ref, model.up.weight, up_bias)), model.down.weight, down_bias)
    assert_matches_reference(out, expected, lambda: [(x.grad, x_ref.grad), (model.up.bias_delta.grad, up_bias.grad),
                                                     (model.down.bias_delta.grad, down_bias.grad)])
    assert model.up.base_layer.weight.grad is None and model.up.base_layer.bias.grad is None


def test_all_linear_on_qwen2_adapts_exactly_the_biased_projections(tiny_qwen2, tokens):
    base_logits = tiny_qwen2(tokens).logits
    lt.attach(tiny_qwen2, lt.BitFit())
    adapted = sorted(n for n, m in tiny_qwen2.named_modules() if isinstance(m, BitFitLayer))
    assert adapted == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv")
    trainable = [n for n, p in tiny_qwen2.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 and all(n.endswith("bias_delta") for n in trainable)
    torch.testing.assert_close(tiny_qwen2(tokens).logits, base_logits, rtol=0, atol=0)


def test_model_without_biases_is_an_error_unless_add_bias(tiny_llama, tokens):
    with pytest.raises(lt.LeantuneError, match="none of the targeted linear layers has a bias.*add_bias=True"):
        lt.attach(tiny_llama, lt.BitFit())
    assert not any(isinstance(m, BitFitLayer) for m in tiny_llama.modules())
    base_logits = tiny_llama(tokens).logits
    lt.attach(tiny_llama, lt.BitFit(add_bias=True))
    torch.testing.assert_close(tiny_llama(tokens).logits, base_logits, rtol=0, atol=0)  # zero-initialised
    assert sum(isinstance(m, BitFitLayer) for m in tiny_llama.modules()) == 14


def test_added_biases_merge_into_new_base_biases_and_unmerge_removes_them(tiny_llama, tokens):
    lt.attach(tiny_llama, lt.BitFit(add_bias=True, targets=["o_proj", "up_proj"]))
    randomize_adapter(tiny_llama, scale=0.5)
    adapted = tiny_llama(tokens).logits
    lt.merge(tiny_llama)
    base = tiny_llama.model.layers[0].self_attn.o_proj.base_layer
    assert base.bias is not None and not base.bias.requires_grad
    torch.testing.assert_close(tiny_llama(tokens).logits, adapted, rtol=1e-4, atol=1e-5)
    lt.unmerge(tiny_llama)
    assert base.bias is None
    torch.testing.assert_close(tiny_llama(tokens).logits, adapted, rtol=0, atol=0)


def test_named_target_without_bias_names_it(tiny_qwen2):
    with pytest.raises(lt.LeantuneError, match=r"target module 'model\.layers\.0\.self_attn\.o_proj' has no bias"):
        lt.attach(tiny_qwen2, lt.BitFit(targets=["q_proj", "o_proj"]))
    assert not any(isinstance(m, BitFitLayer) for m in tiny_qwen2.modules())


def test_bad_config_value_names_the_key():
    with pytest.raises(lt.LeantuneError, match="'add_bias'"):
        lt.BitFit(add_bias="yes")
