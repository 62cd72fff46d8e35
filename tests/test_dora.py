import pytest
import torch
import torch.nn.functional as F

import leantune as lt
from conftest import randomize_adapter
from helpers import assert_matches_reference
from leantune.methods.dora import DoRALayer


def reference_dora(x, weight, bias, a, b, magnitude, scale, x_lora=None):
    """Dense formulation; the row norm is detached (the convention DoRA's layer implements)."""
    combined = weight + scale * (b @ a)
    norm = combined.norm(dim=1).detach()
    x_lora = x if x_lora is None else x_lora
    z = F.linear(x, weight) + scale * F.linear(F.linear(x_lora, a), b)
    out = (magnitude / norm) * z
    return out + bias if bias is not None else out


def _dora_linear(bias: bool, rslora: bool = False, dropout: float = 0.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=bias).double())
    lt.attach(model, lt.DoRA(r=4, alpha=8, rslora=rslora, dropout=dropout, targets=["0"]))
    randomize_adapter(model, scale=0.3)
    return model


def _reference_leaves(layer):
    return [t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_B, layer.magnitude)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_match_reference(bias, rslora):
    model = _dora_linear(bias, rslora)
    layer = model[0]
    base = layer.base_layer
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    out = model(x)
    a, b, m = _reference_leaves(layer)
    x_ref = x.detach().clone().requires_grad_(True)
    expected = reference_dora(x_ref, base.weight.detach(), None if base.bias is None else base.bias.detach(),
                              a, b, m, layer.scale)
    assert_matches_reference(out, expected, lambda: [(x.grad, x_ref.grad), (layer.lora_A.grad, a.grad),
                                                     (layer.lora_B.grad, b.grad), (layer.magnitude.grad, m.grad)])
    assert base.weight.grad is None


def test_dropout_path_matches_reference_with_the_same_mask():
    model = _dora_linear(bias=True, dropout=0.25)
    model.train()
    layer = model[0]
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    x_ref = x.detach().clone().requires_grad_(True)
    dropped = F.dropout(x_ref, 0.25, True)
    a, b, m = _reference_leaves(layer)
    base = layer.base_layer
    expected = reference_dora(x_ref, base.weight.detach(), base.bias.detach(), a, b, m, layer.scale, x_lora=dropped)
    assert_matches_reference(out, expected, lambda: [(x.grad, x_ref.grad), (layer.lora_A.grad, a.grad),
                                                     (layer.magnitude.grad, m.grad)])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_freeze_a_trains_b_and_magnitude_against_reference_and_keeps_no_x(bias, dropout):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=bias).double())
    lt.attach(model, lt.DoRA(r=4, alpha=8, dropout=dropout, freeze_a=True, targets=["0"]))
    randomize_adapter(model, scale=0.3)
    model.train()
    layer = model[0]
    assert [p for p in model.parameters() if p.requires_grad] == [layer.lora_B, layer.magnitude]
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in own:
            saved.append((tensor.untyped_storage().data_ptr(), tensor.numel()))
        return tensor

    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    sizes = [numel for _, numel in saved]
    assert 18 * 4 in sizes and x.untyped_storage().data_ptr() not in {ptr for ptr, _ in saved}  # x Aᵀ, never x
    if not dropout:  # (dropout keeps its mask, the size of x)
        assert 18 * 16 not in sizes
    torch.manual_seed(7)
    x_ref = x.detach().clone().requires_grad_(True)
    dropped = F.dropout(x_ref, dropout, True) if dropout else x_ref
    a, b, m = _reference_leaves(layer)
    a.requires_grad_(False)
    base = layer.base_layer
    expected = reference_dora(x_ref, base.weight.detach(), None if base.bias is None else base.bias.detach(),
                              a, b, m, layer.scale, x_lora=dropped)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.lora_B.grad, b.grad)
    torch.testing.assert_close(layer.magnitude.grad, m.grad)
    assert layer.lora_A.grad is None


def test_zero_magnitude_row_still_gets_its_gradient():
    model = _dora_linear(bias=False)
    layer = model[0]
    with torch.no_grad():
        layer.magnitude[3] = 0
    x = torch.randn(7, 16, dtype=torch.float64)
    a, b, m = _reference_leaves(layer)
    model(x).sum().backward()
    reference_dora(x, layer.base_layer.weight, None, a, b, m, layer.scale).sum().backward()
    torch.testing.assert_close(layer.magnitude.grad, m.grad)
    assert layer.magnitude.grad[3] != 0


def test_plain_path_matches_fused_path(monkeypatch):
    model = _dora_linear(bias=True)
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    fused = model(x)
    fused.sum().backward()
    fused_grads = [p.grad.clone() for p in model[0].adapter_parameters()]
    model.zero_grad()
    monkeypatch.setattr(DoRALayer, "_can_fuse", lambda self, x, weight: False)
    plain = model(x)
    plain.sum().backward()
    torch.testing.assert_close(plain, fused)
    for param, expected in zip(model[0].adapter_parameters(), fused_grads):
        torch.testing.assert_close(param.grad, expected)


def test_row_norms_without_dense_update_match_dense_norms():
    from leantune.methods.dora import row_norms

    torch.manual_seed(3)
    weight, a, b = torch.randn(24, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64), torch.randn(24, 4, dtype=torch.float64)
    expected = (weight + 0.7 * b @ a).norm(dim=1)
    torch.testing.assert_close(row_norms(weight, weight.pow(2).sum(1), a, b, 0.7), expected)


def test_magnitude_starts_at_base_row_norms_and_output_is_unchanged(tiny_llama, tokens):
    base_logits = tiny_llama(tokens).logits
    q_weight = tiny_llama.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lt.attach(tiny_llama, lt.DoRA(r=4))
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.magnitude.detach(), q_weight.norm(dim=1))
    torch.testing.assert_close(tiny_llama(tokens).logits, base_logits, rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in tiny_llama.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 3 and sum("magnitude" in n for n in trainable) == 14


def test_no_weight_sized_tensor_is_saved_for_backward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24, bias=False))
    lt.attach(model, lt.DoRA(r=4, targets=["0"]))
    randomize_adapter(model)
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    x = torch.randn(2, 9, 40)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    assert shapes, "the layer saved nothing: the hook did not see the fused function"
    # x (18 tokens × 40) is the largest thing kept; the weight (24 × 40) is bigger than anything saved
    assert max(torch.Size(s).numel() for s in shapes) == 18 * 40, shapes


def test_pissa_init_keeps_output_and_round_trips(tiny_llama, tokens, tmp_path):
    base_logits = tiny_llama(tokens).logits
    lt.attach(tiny_llama, lt.DoRA(r=4, init="pissa"))
    torch.testing.assert_close(tiny_llama(tokens).logits, base_logits, rtol=1e-4, atol=1e-4)
    randomize_adapter(tiny_llama, scale=0.01)
    adapted = tiny_llama(tokens).logits
    lt.save_adapter(tiny_llama, tmp_path / "pissa")
    fresh = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "pissa")
    torch.testing.assert_close(fresh(tokens).logits, adapted, rtol=0, atol=0)


def test_plain_module_and_training_step_change_the_output(plain_module):
    x = torch.randn(5, 16)
    before = plain_module(x).detach()
    lt.attach(plain_module, lt.DoRA(r=2))
    torch.testing.assert_close(plain_module(x), before)
    optimizer = torch.optim.SGD([p for p in plain_module.parameters() if p.requires_grad], lr=0.1)
    plain_module(x).pow(2).mean().backward()
    optimizer.step()
    assert not torch.allclose(plain_module(x), before)


@pytest.mark.parametrize("kwargs, culprit", [
    ({"r": 0}, "dora: 'r'"), ({"alpha": 0}, "'alpha'"), ({"dropout": -0.1}, "'dropout'"), ({"init": "zeros"}, "'init'"),
])
def test_bad_config_values_name_the_key(kwargs, culprit):
    with pytest.raises(lt.LeantuneError, match=culprit):
        lt.DoRA(**kwargs)


def test_registered_under_its_own_name():
    from leantune.methods import config_from_dict

    config = config_from_dict({"name": "dora", "r": 2})
    assert isinstance(config, lt.DoRA) and config.to_dict()["name"] == "dora"


def test_quantized_base_matches_reference_on_the_dequantized_weight():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
    lt.attach(model, lt.DoRA(r=4, targets=["0"], quantize="nf4"))
    randomize_adapter(model)
    layer = model[0]
    dense = layer.base_module().dequantize_weight()
    x = torch.randn(5, 64)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = model(x)
    a, b, m = _reference_leaves(layer)
    expected = reference_dora(x, dense, None, a, b, m, layer.scale)
    torch.testing.assert_close(out, expected)
    out.backward(torch.ones_like(out))
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(layer.magnitude.grad, m.grad)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-4, atol=1e-5)
    assert (48, 64) not in shapes


@pytest.mark.parametrize("grad", [False, True])
def test_a_base_weight_loaded_after_forwards_reaches_the_norms(grad):
    """‖W0‖² is taken again when the base weight changes (here a load_state_dict into it after a
    forward, plain and routed), not kept from attach time."""
    model = _dora_linear(bias=True).eval()
    layer = model[0]
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        model(x), model(x, adapter_names=["default", "default"])  # norms and stacked forms now cached
        new_weight = torch.randn_like(layer.base_layer.weight)
        model.load_state_dict({"0.base_layer.weight": new_weight}, strict=False)
        expected = reference_dora(x, new_weight, layer.base_layer.bias.detach(), layer.lora_A.detach(),
                                  layer.lora_B.detach(), layer.magnitude.detach(), layer.scale)
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model(x, adapter_names=["default", "default"]), expected)


def test_stacked_over_paca_is_dora_over_the_weight_paca_makes():
    """DoRA on top of PaCA normalises W0 + PaCA's columns + s B A: PaCA writes its columns into the
    base weight, which the norm must follow (a norm of W0 alone gave NaN once both moved)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24).double())
    lt.attach(model, lt.PaCA(r=4, alpha=8, targets=["0"]), adapter_name="paca")
    lt.attach(model, lt.DoRA(r=4, alpha=8, targets=["0"]), adapter_name="dora")
    lt.use(model, ["paca", "dora"])
    randomize_adapter(model, scale=0.5)
    dora = model[0]
    paca = dora.base_layer
    x = torch.randn(3, 16, dtype=torch.float64)
    for _ in range(2):  # the second time with both adapters moved since the first forward
        out = model(x)
        below = paca.clean_weight().detach().clone()  # W0: cleaning takes PaCA's columns back out
        below[:, paca.paca_index] += paca.scale * paca.paca_delta.detach()
        expected = reference_dora(x, below, paca.base_layer.bias.detach(), dora.lora_A.detach(), dora.lora_B.detach(),
                                  dora.magnitude.detach(), dora.scale)
        torch.testing.assert_close(out, expected)
        with torch.no_grad():
            for p in (paca.paca_delta, dora.lora_B, dora.magnitude):
                p.add_(0.3 * torch.randn_like(p))


def _dense_weight_by_hand(layer):
    """The weight a LoRA, input-scaling IA3 or DoRA layer directly over a linear runs with."""
    w0 = layer.base_layer.weight.detach()
    if hasattr(layer, "ia3_l"):
        return w0 * layer.ia3_l.detach()[None, :]
    combined = w0 + layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()
    if hasattr(layer, "magnitude"):
        return layer.magnitude.detach()[:, None] * combined / combined.norm(dim=1, keepdim=True)
    return combined


@pytest.mark.parametrize("below", ["lora", "ia3", "dora"])
def test_stacked_on_another_adapter_normalises_the_weight_that_adapter_runs_with(below):
    """DoRA over LoRA / IA3 / DoRA: W' = m (W_below + s B A) / ‖W_below + s B A‖_row, W_below the
    lower adapter's dense weight; unmerged, merged and freshly attached (no change) alike."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24).double())
    lower = {"lora": lt.LoRA(r=4, alpha=8, targets=["0"]), "ia3": lt.IA3(targets=["0"], feedforward=["0"]),
             "dora": lt.DoRA(r=2, alpha=4, targets=["0"])}[below]
    lt.attach(model, lower, adapter_name="below")
    randomize_adapter(model, scale=0.3)
    x = torch.randn(5, 16, dtype=torch.float64)
    before = model(x)
    lt.attach(model, lt.DoRA(r=4, alpha=8, targets=["0"]), adapter_name="top")
    lt.use(model, ["below", "top"])
    torch.testing.assert_close(model(x), before)  # a fresh DoRA on top changes nothing
    randomize_adapter(model, scale=0.3, seed=1)
    top = model[0]
    w_below = _dense_weight_by_hand(top.base_layer)
    expected = reference_dora(x, w_below, top.base_module().bias.detach(), top.lora_A.detach(), top.lora_B.detach(),
                              top.magnitude.detach(), top.scale)
    torch.testing.assert_close(model(x), expected)
    lt.merge(model)
    torch.testing.assert_close(model(x), expected)


def test_routed_rows_over_pissa_below_normalise_the_original_weight_and_inference_mode_works():
    """A row of the top DoRA runs it alone over W0: PiSSA's original, not its residual."""
    model = lt.load_model("tiny-llama")
    lt.attach(model, lt.LoRA(r=4, alpha=8, init="pissa"), adapter_name="pissa")
    randomize_adapter(model, scale=0.1)
    lt.attach(model, lt.DoRA(r=4, alpha=8), adapter_name="dora")
    randomize_adapter(model, scale=0.1, seed=2)
    model.eval()
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lt.use(model, "dora")
        alone = model(tokens).logits
        lt.use(model, None)
        torch.testing.assert_close(model(tokens, adapter_names=["dora", "dora"]).logits, alone, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # tensors without version counters: no error, the same numbers
        torch.testing.assert_close(model(tokens, adapter_names=["dora", "dora"]).logits, alone, rtol=1e-5, atol=1e-5)


def test_merging_over_an_unmerged_paca_below_is_refused():
    """PaCA places its columns from the original ones: an update merged on top would be overwritten there."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 24).double())
    lt.attach(model, lt.PaCA(r=4, alpha=8, targets=["0"]), adapter_name="paca")
    lt.attach(model, lt.DoRA(r=4, alpha=8, targets=["0"]), adapter_name="dora")
    randomize_adapter(model, scale=0.3)
    x = torch.randn(3, 16, dtype=torch.float64)
    model(x)
    lt.use(model, "dora")
    alone = model(x)
    with pytest.raises(lt.LeantuneError, match="'dora' would merge into base columns that PaCA adapter 'paca'"):
        lt.merge(model)
    torch.testing.assert_close(model(x), alone)  # nothing merged
    lt.use(model, ["paca", "dora"])
    both = model(x)
    lt.merge(model)  # both, PaCA first: allowed
    torch.testing.assert_close(model(x), both)



def test_over_an_output_scaling_ia3_on_a_biased_linear_merged_equals_unmerged():
    """That IA3 scales the bias too: unmerged, DoRA keeps the scaled bias out of what it normalises."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24).double())
    lt.attach(model, lt.IA3(targets=["0"], feedforward=[]), adapter_name="ia3")
    lt.attach(model, lt.DoRA(r=4, alpha=8, targets=["0"]), adapter_name="dora")
    randomize_adapter(model, scale=0.3)
    x = torch.randn(3, 16, dtype=torch.float64)
    unmerged = model(x)
    lt.merge(model)
    torch.testing.assert_close(model(x), unmerged)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_bf16_autocast_trains_and_evaluates_within_bf16_rounding_of_float32(tokens, quantize):
    """Under autocast the fused path (float32 products) steps aside: the loss and the adapter
    gradients are float32's up to bf16 rounding, and an eval forward runs (QDoRA too)."""
    models = []
    for _ in range(2):
        model = lt.load_model("tiny-llama")
        torch.manual_seed(0)
        lt.attach(model, lt.DoRA(r=4, quantize=quantize))
        randomize_adapter(model)
        models.append(model)
    mixed, full = models
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mixed(tokens, labels=tokens).loss
    expected = full(tokens, labels=tokens).loss
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=0)
    loss.backward()
    expected.backward()
    pairs = [(p.grad, q.grad) for p, q in zip(mixed.parameters(), full.parameters()) if p.requires_grad]
    assert pairs and all(torch.linalg.norm(a - b) < 5e-2 * torch.linalg.norm(b) for a, b in pairs)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(mixed.eval()(tokens).logits).all()
