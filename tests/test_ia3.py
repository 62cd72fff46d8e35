import pytest
import torch
import torch.nn.functional as F

import leantune as lt
from conftest import TwoLayer, randomize_adapter
from helpers import assert_matches_reference
from leantune.methods.ia3 import IA3Layer


def reference_ia3(x, weight, bias, vector, feedforward):
    if feedforward:
        return F.linear(x * vector, weight, bias)
    return F.linear(x, weight, bias) * vector


@pytest.mark.parametrize("feedforward", [False, True])
def test_forward_and_gradients_match_reference(feedforward):
    torch.manual_seed(0)
    model = TwoLayer().double()
    lt.attach(model, lt.IA3(targets=["up", "down"], feedforward=["down"] if feedforward else []))
    randomize_adapter(model, scale=0.3)
    layer = model.down
    assert layer.feedforward is feedforward and model.up.feedforward is False
    assert layer.ia3_l.shape == ((24,) if feedforward else (16,))

    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    out = model(x)
    up_l = model.up.ia3_l.detach().clone().requires_grad_(True)
    down_l = layer.ia3_l.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    hidden = torch.relu(reference_ia3(x_ref, model.up.weight, model.up.bias, up_l, False))
    expected = reference_ia3(hidden, layer.weight, layer.bias, down_l, feedforward)
    assert_matches_reference(out, expected, lambda: [(x.grad, x_ref.grad), (model.up.ia3_l.grad, up_l.grad),
                                                     (layer.ia3_l.grad, down_l.grad)])
    assert layer.base_layer.weight.grad is None


def test_defaults_on_llama_scale_key_value_outputs_and_down_input(tiny_llama, tokens):
    base_logits = tiny_llama(tokens).logits
    lt.attach(tiny_llama, lt.IA3())
    adapted = {n: m.feedforward for n, m in tiny_llama.named_modules() if isinstance(m, IA3Layer)}
    assert adapted == {f"model.layers.{i}.{part}": ff for i in range(2)
                       for part, ff in (("self_attn.k_proj", False), ("self_attn.v_proj", False), ("mlp.down_proj", True))}
    torch.testing.assert_close(tiny_llama(tokens).logits, base_logits, rtol=0, atol=0)  # vectors start at one
    layer = tiny_llama.model.layers[0].mlp.down_proj
    assert layer.ia3_l.shape == (128,) and torch.equal(layer.ia3_l.detach(), torch.ones(128))
    trainable = [n for n, p in tiny_llama.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 and all(n.endswith("ia3_l") for n in trainable)


def test_merge_scales_rows_for_outputs_and_columns_for_inputs(tiny_llama):
    k_weight = tiny_llama.model.layers[0].self_attn.k_proj.weight.detach().clone()
    down_weight = tiny_llama.model.layers[0].mlp.down_proj.weight.detach().clone()
    lt.attach(tiny_llama, lt.IA3())
    randomize_adapter(tiny_llama)
    k_vector = tiny_llama.model.layers[0].self_attn.k_proj.ia3_l.detach()
    down_vector = tiny_llama.model.layers[0].mlp.down_proj.ia3_l.detach()
    lt.merge(tiny_llama)
    torch.testing.assert_close(tiny_llama.model.layers[0].self_attn.k_proj.weight, k_weight * k_vector[:, None])
    torch.testing.assert_close(tiny_llama.model.layers[0].mlp.down_proj.weight, down_weight * down_vector[None, :])


def test_default_names_that_match_nothing_explain_the_defaults(plain_module):
    with pytest.raises(lt.LeantuneError, match=r"target 'k_proj' matches no module.*ia3 defaults to the Llama-style names"):
        lt.attach(plain_module, lt.IA3())
    assert all(p.requires_grad for p in plain_module.parameters())


def test_feedforward_outside_targets_is_an_error(tiny_llama):
    with pytest.raises(lt.LeantuneError, match="feedforward entry 'up_proj' matches none of the targeted modules"):
        lt.attach(tiny_llama, lt.IA3(targets=["k_proj", "down_proj"], feedforward=["up_proj"]))
    assert not any(isinstance(m, IA3Layer) for m in tiny_llama.modules())


@pytest.mark.parametrize("kwargs, culprit", [
    ({"feedforward": [3]}, "'feedforward'"), ({"feedforward": {"down": 1}}, "'feedforward'"), ({"targets": []}, "'targets'"),
])
def test_bad_config_values_name_the_key(kwargs, culprit):
    with pytest.raises(lt.LeantuneError, match=culprit):
        lt.IA3(**kwargs)
