import math

import pytest
import torch
import torch.nn.functional as F

import leantune as lt
from conftest import TwoLayer, randomize_adapter
from helpers import assert_matches_reference, check_bf16_autocast_against_dense_twin, relative_error

BF16_RELATIVE = 1e-2  # a few bf16 roundings (2^-9 each) of a matmul's inputs and output


def reference_lora(x, weight, bias, a, b, scale):
    return F.linear(x, weight, bias) + scale * (x @ a.t() @ b.t())


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_match_reference(rslora):
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24).double()
    model = torch.nn.Sequential(base)
    lt.attach(model, lt.LoRA(r=4, alpha=8, rslora=rslora, targets=["0"]))
    layer = model[0]
    randomize_adapter(model)
    scale = 8 / (math.sqrt(4) if rslora else 4)
    assert layer.scale == pytest.approx(scale)

    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    out = model(x)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = reference_lora(x_ref, base.weight.detach(), base.bias.detach(), a, b, scale)
    assert_matches_reference(out, expected,
                             lambda: [(x.grad, x_ref.grad), (layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad)])
    assert base.weight.grad is None


def test_unfused_path_matches_fused_path(monkeypatch):
    from leantune.methods.lora import LoRALayer

    torch.manual_seed(0)
    model = TwoLayer()
    lt.attach(model, lt.LoRA(r=4, dropout=0.1))
    randomize_adapter(model)
    x = torch.randn(4, 16)
    model.eval()  # no dropout in eval: the fused path runs
    fused = model(x)
    monkeypatch.setattr(LoRALayer, "_can_fuse", lambda self: False)
    torch.testing.assert_close(model(x), fused)


def test_only_adapter_parameters_train(tiny_llama):
    lt.attach(tiny_llama, lt.LoRA(r=4))
    trainable = [n for n, p in tiny_llama.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # all 7 projections of 2 layers, not the output head
    assert len(trainable) == 2 * 7 * 2
    info = lt.summary(tiny_llama)
    assert info["adapters"]["default"]["modules"] == 14
    assert info["trainable"] == sum(p.numel() for n, p in tiny_llama.named_parameters() if "lora_" in n)


def test_pissa_keeps_output_and_restores_base(tiny_llama, tokens, tmp_path):
    base_logits = tiny_llama(tokens).logits
    base_weight = tiny_llama.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lt.attach(tiny_llama, lt.LoRA(r=4, init="pissa"))
    torch.testing.assert_close(tiny_llama(tokens).logits, base_logits, rtol=1e-4, atol=1e-4)
    randomize_adapter(tiny_llama, scale=0.01)
    adapted = tiny_llama(tokens).logits
    with lt.disabled(tiny_llama):
        torch.testing.assert_close(tiny_llama(tokens).logits, base_logits, rtol=0, atol=0)
    lt.save_adapter(tiny_llama, tmp_path / "pissa")
    fresh = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "pissa")
    torch.testing.assert_close(fresh(tokens).logits, adapted, rtol=0, atol=0)
    lt.detach(tiny_llama)
    assert torch.equal(tiny_llama.model.layers[0].self_attn.q_proj.weight, base_weight)


def test_plain_module_works(plain_module):
    x = torch.randn(5, 16)
    before = plain_module(x)
    lt.attach(plain_module, lt.LoRA(r=2))
    torch.testing.assert_close(plain_module(x), before)  # B starts at zero
    assert hasattr(plain_module.up, "lora_A") and hasattr(plain_module.down, "lora_A")


@pytest.mark.parametrize("kwargs, culprit", [
    ({"r": 0}, "'r'"), ({"r": 2.5}, "'r'"), ({"alpha": -1}, "'alpha'"),
    ({"dropout": 1.5}, "'dropout'"), ({"init": "xavier"}, "'init'"), ({"quantize": "int3"}, "'quantize'"),
])
def test_bad_config_values_name_the_key(kwargs, culprit):
    with pytest.raises(lt.LeantuneError, match=culprit):
        lt.LoRA(**kwargs)


def test_unknown_key_from_dict():
    from leantune.methods import config_from_dict

    with pytest.raises(lt.LeantuneError, match="unknown key 'rank'; valid keys: alpha, "):
        config_from_dict({"name": "lora", "rank": 4})


def test_target_that_matches_nothing_names_it_and_closest(tiny_llama):
    with pytest.raises(lt.LeantuneError, match=r"target 'q_prj' matches no module; closest module names: .*q_proj"):
        lt.attach(tiny_llama, lt.LoRA(targets=["q_proj", "q_prj"]))
    assert not any(p.requires_grad is False for p in tiny_llama.parameters())  # nothing half-attached


def test_regex_exclude_and_layers(tiny_llama):
    lt.attach(tiny_llama, lt.LoRA(targets=r".*\.(q_proj|k_proj|v_proj)", exclude=["k_proj"], layers=[1]))
    adapted = [n for n, m in tiny_llama.named_modules() if hasattr(m, "lora_A")]
    assert adapted == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_attaching_twice_under_one_name_is_an_error(tiny_llama):
    lt.attach(tiny_llama, lt.LoRA())
    with pytest.raises(lt.LeantuneError, match="already attached"):
        lt.attach(tiny_llama, lt.LoRA())


def test_bf16_autocast_forward_and_gradients_match_a_dense_reference():
    """Under CPU bf16 autocast the adapted linear equals W x + b + s (x Aᵀ) Bᵀ written with plain
    matmuls under the same autocast, and is within bf16 rounding of the exact float64 result."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48)
    model = torch.nn.Sequential(base)
    lt.attach(model, lt.LoRA(r=8, alpha=16, targets=["0"]))
    layer = model[0]
    randomize_adapter(model, scale=0.2)  # the update is about as large as W x
    x = torch.randn(4, 7, 64, requires_grad=True)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        expected = reference_lora(x_ref, base.weight, base.bias, a, b, 2.0)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)  # bf16 tolerances
    exact = [t.detach().double().requires_grad_(True) for t in (x, a, b)]
    exact_out = reference_lora(exact[0], base.weight.double(), base.bias.double(), exact[1], exact[2], 2.0)
    # three bf16 roundings (inputs, factors, output) of 2^-9 each: a few 1e-3 in all
    assert relative_error(out, exact_out) < BF16_RELATIVE
    assert relative_error(out, reference_lora(exact[0], base.weight.double(), base.bias.double(), exact[1],
                                              torch.zeros_like(exact[2]), 2.0)) > 0.5  # the adapter counts

    grad = torch.randn(out.shape)
    out.float().backward(grad)
    expected.float().backward(grad)
    exact_out.backward(grad.double())
    for mine, ref, full in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad), (x_ref.grad, a.grad, b.grad),
                               (t.grad for t in exact)):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, ref, rtol=1.6e-2, atol=1e-5)
        assert relative_error(mine, full) < BF16_RELATIVE
    assert base.weight.grad is None


def test_bf16_autocast_model_matches_its_dense_twin(tiny_llama, tokens):
    torch.manual_seed(0)  # A is drawn from the global generator
    lt.attach(tiny_llama, lt.LoRA(r=4))
    randomize_adapter(tiny_llama)
    check_bf16_autocast_against_dense_twin(tiny_llama, tokens)
