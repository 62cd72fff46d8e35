import math

import pytest
import torch
import torch.nn.functional as F

import leantune as lt
from conftest import TwoLayer, randomize_adapter
from helpers import assert_matches_reference, check_bf16_autocast_against_dense_twin, relative_error
from leantune.files import load_tensors

BF16_RELATIVE = 1e-2  # a few bf16 roundings (2^-9 each) of a matmul's inputs and output


def reference_lora(x, weight, bias, a, b, scale):
    return F.linear(x, weight, bias) + scale * (x @ a.t() @ b.t())


def _backward_alike(out, expected, *pairs):
    """Back-propagate one random gradient through both outputs; each (ours, reference) pair of leaves
    gets the same gradient to float64 precision."""
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for ours, reference in pairs:
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-12, atol=1e-12)


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


# -- LoRA-FA: A frozen at its random init, only B trains ------------------------------------------

def _lora_fa_linear(in_features=32, out_features=48, r=4, dtype=torch.float64, dropout=0.0):
    torch.manual_seed(0)
    base = torch.nn.Linear(in_features, out_features).to(dtype)
    model = torch.nn.Sequential(base)
    lt.attach(model, lt.LoRA(r=r, alpha=2 * r, dropout=dropout, freeze_a=True, targets=["0"]))
    randomize_adapter(model)
    return model, model[0]


@pytest.mark.parametrize("fused", [True, False])
def test_lora_fa_forward_and_gradients_match_dense_autograd(fused, monkeypatch):
    from leantune.methods.lora import LoRALayer

    model, layer = _lora_fa_linear()
    if not fused:
        monkeypatch.setattr(LoRALayer, "_can_fuse", lambda self: False)
    a0 = layer.lora_A.detach().clone()
    assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert [p for p in model.parameters() if p.requires_grad] == [layer.lora_B]
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()  # random, not zero

    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    out = model(x)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = reference_lora(x_ref, layer.base_layer.weight.detach(), layer.base_layer.bias.detach(), a0, b, layer.scale)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    _backward_alike(out, expected, (x, x_ref), (layer.lora_B, b))
    assert layer.lora_A.grad is None and layer.base_layer.weight.grad is None

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    assert torch.equal(layer.lora_A, a0) and not torch.equal(layer.lora_B, b.detach())


def _saved_activation_bytes(model, x):
    """Bytes autograd keeps for backward of `model(x)`, not counting the model's own tensors."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in own:
            saved[tensor.untyped_storage().data_ptr()] = (tuple(tensor.shape), tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return list(saved.values())


def test_lora_fa_saves_only_x_times_a_for_backward():
    tokens, r = 2 * 9, 4
    fa, _ = _lora_fa_linear(r=r, dtype=torch.float32)
    x = torch.randn(2, 9, 32, requires_grad=True)
    saved = _saved_activation_bytes(fa, x)
    assert sum(size for _, size in saved) == tokens * r * 4  # x Aᵀ: tokens × r float32, and nothing else
    assert all(torch.Size(shape).numel() != tokens * 32 for shape, _ in saved)  # never x

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(32, 48))
    lt.attach(plain, lt.LoRA(r=r, alpha=2 * r, targets=["0"]))
    assert sum(size for _, size in _saved_activation_bytes(plain, x)) == tokens * (32 + r) * 4  # x and x Aᵀ


def test_lora_fa_adapter_holds_a_and_merges_and_disables(tiny_llama, tokens, tmp_path):
    base = tiny_llama(tokens).logits.detach()
    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8, freeze_a=True))
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("lora_B") for n in trainable) and len(trainable) == 14
    assert lt.summary(tiny_llama)["trainable"] == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64) * 4
    randomize_adapter(tiny_llama)
    adapted = tiny_llama(tokens).logits.detach()
    with lt.disabled(tiny_llama):
        torch.testing.assert_close(tiny_llama(tokens).logits, base, rtol=0, atol=0)
    lt.save_adapter(tiny_llama, tmp_path / "fa")
    saved = load_tensors(tmp_path / "fa" / "adapter.safetensors")
    assert sum(k.endswith("lora_A") for k in saved) == 14
    fresh = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "fa")
    assert lt.attached(fresh)["default"].freeze_a and not fresh.model.layers[0].self_attn.q_proj.lora_A.requires_grad
    torch.testing.assert_close(fresh(tokens).logits, adapted, rtol=0, atol=0)
    lt.merge(tiny_llama)
    torch.testing.assert_close(tiny_llama(tokens).logits, adapted, rtol=1e-4, atol=1e-5)


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
    ({"freeze_a": "yes"}, "lora: 'freeze_a' must be true or false"),
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


@pytest.mark.parametrize("layers, sentence", [
    ([0, 5], r"lora: 'layers' names block\(s\) \[5\] where the targets match no module \(they match blocks 0-1\)"),
    ([-1], r"lora: 'layers' counts blocks from 0 \(the first\), got \[-1\]"),
])
def test_layers_the_model_does_not_have_are_an_error_and_touch_nothing(tiny_llama, layers, sentence):
    with pytest.raises(lt.LeantuneError, match=sentence):
        lt.attach(tiny_llama, lt.LoRA(layers=layers))
    assert not lt.attached(tiny_llama)


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


@pytest.mark.parametrize("freeze_a", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_dropout_in_training_matches_dense_autograd_with_the_same_mask(fused, freeze_a, monkeypatch):
    """Training with dropout runs the fused function too (only xd and xd·Aᵀ saved); both paths equal
    x Wᵀ + b + s (dropout(x) Aᵀ) Bᵀ under the same dropout draw, forward and every gradient."""
    from leantune.methods.lora import LoRALayer, _FusedLoRA

    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48).double()
    model = torch.nn.Sequential(base)
    lt.attach(model, lt.LoRA(r=4, alpha=8, dropout=0.25, freeze_a=freeze_a, targets=["0"]))
    randomize_adapter(model)
    layer = model[0]
    calls = []
    monkeypatch.setattr(_FusedLoRA, "apply", lambda *args, _apply=_FusedLoRA.apply: calls.append(1) or _apply(*args))
    if not fused:
        monkeypatch.setattr(LoRALayer, "_can_fuse", lambda self: False)
    model.train()
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    out = model(x)
    assert bool(calls) == fused

    torch.manual_seed(7)
    x_ref = x.detach().clone().requires_grad_(True)
    a = layer.lora_A.detach().clone().requires_grad_(not freeze_a)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    dropped = torch.nn.functional.dropout(x_ref, 0.25, True)
    expected = x_ref @ base.weight.detach().t() + base.bias.detach() + layer.scale * (dropped @ a.t()) @ b.t()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    _backward_alike(out, expected, (x, x_ref), (layer.lora_B, b))
    if freeze_a:
        assert layer.lora_A.grad is None
    else:
        torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_pissa_switched_off_after_a_cast_runs_the_cast_original_weight(tokens, dtype):
    model = lt.load_model("tiny-llama")
    lt.attach(model, lt.LoRA(r=4, init="pissa"))
    model.eval().to(dtype)
    base = lt.load_model("tiny-llama").eval().to(dtype)
    with torch.no_grad():
        expected = base(tokens).logits
        with lt.disabled(model):
            torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)
    lt.detach(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight,
                               rtol=0, atol=0)
