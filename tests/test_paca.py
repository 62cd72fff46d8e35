import pytest
import torch
import torch.nn.functional as F

import leantune as lt
from conftest import TwoLayer, randomize_adapter
from helpers import assert_matches_reference, check_bf16_autocast_against_dense_twin, relative_error
from leantune.methods.paca import PaCALayer, choose_columns


def paca_layers(model):
    return [m for m in model.modules() if isinstance(m, PaCALayer)]


def dense_reference(x, weight, bias, contributions):
    """Autograd on W0 plus masked trainable columns: contributions is [(index, delta, scale)].

    Returns the output and, per contribution, the full-size trainable tensor whose masked
    columns are the delta (its gradient outside those columns stays zero)."""
    full = []
    effective = weight
    for index, delta, scale in contributions:
        mask = torch.zeros_like(weight)
        mask[:, index] = 1
        d = torch.zeros_like(weight)
        d[:, index] = delta
        d.requires_grad_(True)
        full.append(d)
        effective = effective + scale * d * mask
    return F.linear(x, effective, bias), full


@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_dense_reference(shape, bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24, bias=bias).double()
    w0 = base.weight.detach().clone()
    model = torch.nn.Sequential(base)
    lt.attach(model, lt.PaCA(r=4, alpha=8, targets=["0"]))
    layer = model[0]
    randomize_adapter(model)
    assert layer.paca_delta.dtype == torch.float64 and layer.scale == 2.0

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = model(x)
    x_ref = x.detach().clone().requires_grad_(True)
    expected, (d,) = dense_reference(x_ref, w0, None if base.bias is None else base.bias.detach(),
                                     [(layer.paca_index, layer.paca_delta.detach(), 2.0)])
    assert_matches_reference(out, expected,
                             lambda: [(x.grad, x_ref.grad), (layer.paca_delta.grad, d.grad[:, layer.paca_index])])
    assert base.weight.grad is None


def test_columns_are_sorted_reproducible_and_independent_of_attach_order(tiny_llama):
    lt.attach(tiny_llama, lt.PaCA(r=8, seed=3))
    q_proj = tiny_llama.model.layers[1].self_attn.q_proj
    other = lt.attach(lt.load_model("tiny-llama"), lt.PaCA(r=8, seed=3, targets=["layers.1.self_attn.q_proj"]))
    index = q_proj.paca_index
    assert torch.equal(index, other.model.layers[1].self_attn.q_proj.paca_index)
    assert torch.equal(index, index.sort().values) and index.unique().numel() == 8
    assert torch.equal(index, choose_columns(64, 8, 3, "model.layers.1.self_attn.q_proj"))
    assert not torch.equal(index, choose_columns(64, 8, 4, "model.layers.1.self_attn.q_proj"))
    assert not torch.equal(index, tiny_llama.model.layers[1].self_attn.k_proj.paca_index)


def test_only_x_columns_are_saved_for_backward():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48)
    w0 = base.weight.detach().clone()
    model = torch.nn.Sequential(base)
    lt.attach(model, lt.PaCA(r=4, targets=["0"]))
    randomize_adapter(model)
    layer = model[0]
    x = torch.randn(2, 9, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        out = model(x)
    assert sum(saved) == 2 * 9 * 4 * 4  # X[..., I]: tokens x r float32, nothing else (not X, not W)
    # ... and what backward rebuilds from them is the dense result
    x_ref = x.detach().clone().requires_grad_(True)
    expected, (d,) = dense_reference(x_ref, w0, base.bias.detach(), [(layer.paca_index, layer.paca_delta.detach(), layer.scale)])
    assert_matches_reference(out, expected,
                             lambda: [(x.grad, x_ref.grad), (layer.paca_delta.grad, d.grad[:, layer.paca_index])])


def test_optimizer_step_refreshes_only_the_selected_columns():
    torch.manual_seed(0)
    model = TwoLayer()
    w0 = model.up.weight.detach().clone()
    w0_down = model.down.weight.detach().clone()
    lt.attach(model, lt.PaCA(r=3, alpha=6))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(6, 16)
    model(x).pow(2).sum().backward()
    optimizer.step()
    layer = model.up
    out = model(x)
    index = layer.paca_index
    others = torch.ones(16, dtype=torch.bool)
    others[index] = False
    assert torch.equal(layer.weight[:, others], w0[:, others])  # untouched, bit for bit
    torch.testing.assert_close(layer.weight[:, index], w0[:, index] + 2.0 * layer.paca_delta.detach())
    expected, _ = dense_reference(x, w0, model.up.bias.detach(), [(index, layer.paca_delta.detach(), 2.0)])
    torch.testing.assert_close(model.up(x), expected)
    down = model.down
    assert not torch.equal(down.paca_delta, torch.zeros_like(down.paca_delta))  # the step moved both layers
    expected_out, _ = dense_reference(torch.relu(expected), w0_down, down.bias.detach(),
                                      [(down.paca_index, down.paca_delta.detach(), 2.0)])
    torch.testing.assert_close(out, expected_out)


def test_backward_differentiates_the_columns_its_forward_used():
    """Δ changed (and a forward placed the new columns) between a forward and its backward: the
    backward still uses the weight that forward computed with, as autograd on the dense weight would."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 8).double()
    w0 = base.weight.detach().clone()
    model = torch.nn.Sequential(base)
    lt.attach(model, lt.PaCA(r=2, alpha=2, targets=["0"]))
    layer = model[0]
    randomize_adapter(model)
    old_delta = layer.paca_delta.detach().clone()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    out = model(x)
    with torch.no_grad():
        layer.paca_delta.add_(1.0)
    model(x)  # places the new columns
    grad = torch.randn_like(out)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    expected, (d,) = dense_reference(x_ref, w0, base.bias.detach(), [(layer.paca_index, old_delta, 1.0)])
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.paca_delta.grad, d.grad[:, layer.paca_index])


@pytest.mark.parametrize("write", ["data", "no_grad_copy", "new_tensor"])
def test_every_change_of_delta_reaches_the_next_forward(write):
    """A hand-written SGD loop through `.data` (which no version counter sees), an in-place copy, or
    a whole new tensor: each forward computes with the Δ of that moment (dense reference)."""
    torch.manual_seed(0)
    model = TwoLayer().double()
    w0 = model.up.weight.detach().clone()
    lt.attach(model, lt.PaCA(r=3, alpha=6, targets=["up"]))
    layer = model.up
    x = torch.randn(6, 16, dtype=torch.float64)
    for _ in range(3):
        model(x).pow(2).sum().backward()
        step = 0.05 * layer.paca_delta.grad
        if write == "data":
            layer.paca_delta.data -= step
        elif write == "no_grad_copy":
            with torch.no_grad():
                layer.paca_delta.copy_(layer.paca_delta - step)
        else:
            layer.paca_delta.data = layer.paca_delta.data - step
        layer.paca_delta.grad = None
        expected, _ = dense_reference(x, w0, model.up.bias.detach(), [(layer.paca_index, layer.paca_delta.detach(), 2.0)])
        torch.testing.assert_close(model.up(x), expected)
    assert layer.paca_delta.abs().sum() > 0


def _write_base(model, weights, how):
    """Write new base weights after attaching, the ways users and loaders do."""
    up = model.up.base_module()
    if how == "load_state_dict":
        up.load_state_dict({"weight": weights, "bias": up.bias.detach()})
    elif how == "copy":
        with torch.no_grad():
            up.weight.copy_(weights)
    elif how == "data":
        up.weight.data = weights.clone()
    elif how == "new_parameter":
        up.weight = torch.nn.Parameter(weights.clone(), requires_grad=False)
    else:  # a few elements, through .data, which no version counter sees
        up.weight.data[:, :3] = weights[:, :3]
        weights = torch.cat([weights[:, :3], up.weight.detach()[:, 3:]], 1)
    return weights


@pytest.mark.parametrize("how", ["load_state_dict", "copy", "data", "new_parameter", "some_elements"])
def test_a_base_weight_written_after_attaching_is_the_base_from_then_on(how):
    """Weights loaded after attaching (a model built from its config, attached, then loaded): the
    adapted forward is the new weight plus s Δ in its columns, disabled and detach give the new weight."""
    torch.manual_seed(0)
    model = TwoLayer().double()
    lt.attach(model, lt.PaCA(r=3, alpha=6, targets=["up"]))
    layer = model.up
    x = torch.randn(6, 16, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    with torch.no_grad():
        layer.paca_delta -= 0.5 * layer.paca_delta.grad  # trained a little: Δ is not zero
    bias = layer.base_module().bias.detach()
    new = _write_base(model, torch.randn(24, 16, dtype=torch.float64), how)
    expected, _ = dense_reference(x, new, bias, [(layer.paca_index, layer.paca_delta.detach(), 2.0)])
    torch.testing.assert_close(model.up(x), expected)
    with torch.no_grad(), lt.disabled(model):
        torch.testing.assert_close(model.up(x), F.linear(x, new, bias))
    lt.detach(model)
    torch.testing.assert_close(model.up.weight, new, rtol=0, atol=0)


def test_backward_restores_columns_replaced_by_a_disabled_forward():
    torch.manual_seed(0)
    model = TwoLayer().double()
    lt.attach(model, lt.PaCA(r=4))
    randomize_adapter(model)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    out = model(x)
    with torch.no_grad(), lt.disabled(model):
        model(x)  # a reference forward in between, as preference training does
    out.sum().backward()
    reference = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(x.grad, reference, rtol=0, atol=0)


def test_loaded_columns_win_over_the_drawn_ones(tmp_path, tokens):
    from leantune.adapters.native import TENSOR_FILE
    from leantune.files import load_tensors, save_tensors

    model = lt.load_model("tiny-llama")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lt.attach(model, lt.PaCA(r=4, targets=["o_proj"]))
    randomize_adapter(model)
    lt.save_adapter(model, tmp_path / "a")
    tensors = load_tensors(tmp_path / "a" / TENSOR_FILE)
    key = "model.layers.0.self_attn.o_proj.paca_index"
    tensors[key] = torch.tensor([0, 1, 2, 63])
    save_tensors(tensors, tmp_path / "a" / TENSOR_FILE)
    fresh = lt.load_model("tiny-llama")
    lt.load_adapter(fresh, tmp_path / "a")
    layer = fresh.model.layers[0].self_attn.o_proj
    assert layer.paca_index.tolist() == [0, 1, 2, 63]
    w0 = base_state["model.layers.0.self_attn.o_proj.weight"]
    x = torch.randn(3, 64)
    expected, _ = dense_reference(x, w0, None, [(layer.paca_index, layer.paca_delta.detach(), layer.scale)])
    torch.testing.assert_close(layer(x), expected)
    lt.detach(fresh)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, base_state[name]), name

    tensors[key] = torch.tensor([3, 2, 1, 0])
    save_tensors(tensors, tmp_path / "a" / TENSOR_FILE)
    with pytest.raises(lt.LeantuneError, match="paca_index"):
        lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "a")


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tokens, reentrant):
    def grads(checkpointing):
        model = lt.load_model("tiny-llama")
        lt.attach(model, lt.PaCA(r=8))
        randomize_adapter(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:
                model.enable_input_require_grads()
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD(params.values(), lr=0.5)
        for _ in range(2):  # the second step runs on refreshed columns
            optimizer.zero_grad()
            model(tokens, labels=tokens).loss.backward()
            result = {n: p.grad.clone() for n, p in params.items()}
            optimizer.step()
        return result

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_stacked_adapters_compose_and_restore():
    torch.manual_seed(0)
    model = TwoLayer(dim=12, hidden=20).double()
    w0 = {n: m.weight.detach().clone() for n, m in model.named_children()}
    bias = {n: m.bias.detach().clone() for n, m in model.named_children()}
    lt.attach(model, lt.PaCA(r=4, alpha=4, seed=0), "a")
    lt.attach(model, lt.PaCA(r=4, alpha=8, seed=0), "b")  # same columns as "a"
    lt.attach(model, lt.PaCA(r=5, alpha=5, seed=1), "c")
    randomize_adapter(model)
    x = torch.randn(4, 12, dtype=torch.float64)

    def layers(name):
        return {a.adapter_name: a for a in paca_layers(getattr(model, name))}

    def reference(active):
        h = x
        for name in ("up", "down"):
            contributions = [(lay.paca_index, lay.paca_delta.detach(), lay.scale)
                             for n, lay in layers(name).items() if n in active]
            h, _ = dense_reference(h, w0[name], bias[name], contributions)
            h = torch.relu(h) if name == "up" else h
        return h

    torch.testing.assert_close(model(x), reference("abc"))
    with lt.disabled(model, "b"):
        torch.testing.assert_close(model(x), reference("ac"))
    with lt.disabled(model, "c"):
        torch.testing.assert_close(model(x), reference("ab"))
    lt.merge(model, "b")
    torch.testing.assert_close(model(x), reference("abc"))
    with lt.disabled(model, "a"):
        torch.testing.assert_close(model(x), reference("bc"))
    lt.merge(model)
    torch.testing.assert_close(model(x), reference("abc"))
    lt.unmerge(model, "a")
    torch.testing.assert_close(model(x), reference("abc"))
    lt.unmerge(model)

    # gradients of every stacked delta equal those of the dense reference
    grad = torch.randn(4, 12, dtype=torch.float64)
    model(x).backward(grad)
    h, leaves = x, {}
    for name in ("up", "down"):
        stacked = list(layers(name).values())
        h, full = dense_reference(h, w0[name], bias[name], [(lay.paca_index, lay.paca_delta.detach(), lay.scale)
                                                            for lay in stacked])
        leaves.update({id(lay): d for lay, d in zip(stacked, full)})
        h = torch.relu(h) if name == "up" else h
    h.backward(grad)
    assert len(leaves) == 6
    for lay in paca_layers(model):
        torch.testing.assert_close(lay.paca_delta.grad, leaves[id(lay)].grad[:, lay.paca_index])
        lay.paca_delta.grad = None

    lt.detach(model, "b")
    torch.testing.assert_close(model(x), reference("ac"))
    lt.detach(model, "a")
    torch.testing.assert_close(model(x), reference("c"))
    lt.detach(model)
    for name in ("up", "down"):
        assert torch.equal(getattr(model, name).weight, w0[name])


def test_stacked_gradients_match_reference():
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 6).double()
    w0 = base.weight.detach().clone()
    model = torch.nn.Sequential(base)
    lt.attach(model, lt.PaCA(r=3, alpha=3, seed=0, targets=["0"]), "a")
    lt.attach(model, lt.PaCA(r=4, alpha=8, seed=7, targets=["0"]), "b")
    randomize_adapter(model)
    outer, inner = model[0], model[0].base_layer
    x = torch.randn(5, 10, dtype=torch.float64)
    out = model(x)
    expected, (d_inner, d_outer) = dense_reference(
        x, w0, base.bias.detach(), [(inner.paca_index, inner.paca_delta.detach(), 1.0),
                                    (outer.paca_index, outer.paca_delta.detach(), 2.0)])
    assert_matches_reference(out, expected, lambda: [(inner.paca_delta.grad, d_inner.grad[:, inner.paca_index]),
                                                     (outer.paca_delta.grad, d_outer.grad[:, outer.paca_index])])


def test_paca_on_top_of_lora_adds_its_columns():
    torch.manual_seed(0)
    model = TwoLayer().double()
    w0, b0 = model.up.weight.detach().clone(), model.up.bias.detach().clone()
    lt.attach(model, lt.LoRA(r=2), "lora")
    randomize_adapter(model)
    lora = model.up
    a, b = lora.lora_A.detach().clone(), lora.lora_B.detach().clone()
    x = torch.randn(3, 16, dtype=torch.float64)
    with_lora = F.linear(x, w0, b0) + lora.scale * x @ a.t() @ b.t()
    torch.testing.assert_close(model.up(x), with_lora)
    lt.attach(model, lt.PaCA(r=4), "paca")
    randomize_adapter(model, seed=2)
    layer = model.up
    a, b = layer.base_layer.lora_A.detach().clone(), layer.base_layer.lora_B.detach().clone()
    delta = torch.zeros_like(w0)
    delta[:, layer.paca_index] = layer.paca_delta.detach()
    expected = F.linear(x, w0 + lora.scale * b @ a + layer.scale * delta, b0)
    torch.testing.assert_close(model.up(x), expected)
    lt.merge(model)
    torch.testing.assert_close(model.up(x), expected)
    lt.detach(model, "paca")  # unmerges it: the LoRA adapter alone again
    torch.testing.assert_close(model.up(x), F.linear(x, w0 + lora.scale * b @ a, b0))
    lt.detach(model, "lora")
    torch.testing.assert_close(model.up(x), F.linear(x, w0, b0))


def test_paca_to_lora_gives_the_same_logits(tiny_llama, tokens, tmp_path):
    lt.attach(tiny_llama, lt.PaCA(r=4, alpha=8, targets=["q_proj", "up_proj"]))
    randomize_adapter(tiny_llama)
    expected = tiny_llama(tokens).logits
    lt.paca_to_lora(tiny_llama)
    config = lt.attached(tiny_llama)["default"]
    assert isinstance(config, lt.LoRA) and config.r == 4 and config.alpha == 8
    assert not paca_layers(tiny_llama)
    torch.testing.assert_close(tiny_llama(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    lt.save_adapter(tiny_llama, tmp_path / "lora")
    fresh = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "lora")
    torch.testing.assert_close(fresh(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_paca_to_lora_on_stacked_adapters(tokens):
    model = lt.load_model("tiny-llama")
    lt.attach(model, lt.PaCA(r=4, targets=["v_proj"]), "a")
    lt.attach(model, lt.PaCA(r=4, seed=2, targets=["v_proj"]), "b")
    randomize_adapter(model)
    expected = model(tokens).logits
    lt.paca_to_lora(model)
    assert [c.method_name for c in lt.attached(model).values()] == ["lora", "lora"]
    torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, culprit", [
    ({"r": 0}, "'r'"), ({"r": -2}, "'r'"), ({"alpha": 0}, "'alpha'"), ({"seed": -1}, "'seed'"),
    ({"quantize": "int8"}, "'quantize'"),
])
def test_bad_config_values_name_the_key(kwargs, culprit):
    with pytest.raises(lt.LeantuneError, match=culprit):
        lt.PaCA(**kwargs)


def test_r_larger_than_in_features_is_an_error_and_touches_nothing(tiny_llama):
    with pytest.raises(lt.LeantuneError, match=r"'r' = 65 is larger than the 64 input features of 'model.layers.0"):
        lt.attach(tiny_llama, lt.PaCA(r=65))
    assert not paca_layers(tiny_llama)


def test_non_linear_target_is_an_error(tiny_llama):
    with pytest.raises(lt.LeantuneError, match="embed_tokens' is a Embedding, this method adapts only Linear"):
        lt.attach(tiny_llama, lt.PaCA(r=2, targets=["embed_tokens"]))


def test_trains_and_loss_goes_down(tiny_llama, tokens):
    lt.attach(tiny_llama, lt.PaCA(r=8, alpha=16))
    tiny_llama.train()
    optimizer = torch.optim.AdamW([p for p in tiny_llama.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = tiny_llama(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 64)])
def test_bf16_autocast_runs_the_gemms_as_a_linear_would_and_sums_the_delta_gradient_in_float32(shape):
    """Under bf16 autocast PaCA's layer computes what a linear of its effective weight computes there
    (bf16 operands and output), x's gradient comes back in float32, and Δ's gradient is within
    bf16 rounding of the float64 formula s · Gᵀ X_I."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = torch.nn.Sequential(base)
    lt.attach(model, lt.PaCA(r=8, alpha=16, targets=["0"]))
    layer = model[0]
    randomize_adapter(model, scale=0.2)
    x = torch.randn(*shape, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    effective = w0.index_add(1, layer.paca_index, 2.0 * layer.paca_delta.detach())
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x_ref, effective, b0)
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1e-2)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1.6e-2, atol=1e-2)
    g64, x64 = grad.double().reshape(-1, 48), x.detach().double().reshape(-1, 64)
    delta_grad = 2.0 * g64.t() @ x64[:, layer.paca_index]
    assert layer.paca_delta.grad.dtype == torch.float32
    assert relative_error(layer.paca_delta.grad.double(), delta_grad) < 1e-2


def test_a_float64_layer_stays_float64_under_bf16_autocast_as_a_linear_does():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48).double()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = torch.nn.Sequential(base)
    lt.attach(model, lt.PaCA(r=8, alpha=16, targets=["0"]))
    randomize_adapter(model, scale=0.2)
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.float64
    effective = w0.index_add(1, model[0].paca_index, 2.0 * model[0].paca_delta.detach())
    torch.testing.assert_close(out, F.linear(x, effective, b0), rtol=1e-12, atol=1e-12)


def test_bf16_autocast_model_matches_its_dense_twin(tiny_llama, tokens):
    lt.attach(tiny_llama, lt.PaCA(r=4, alpha=8))
    randomize_adapter(tiny_llama)
    check_bf16_autocast_against_dense_twin(tiny_llama, tokens)


def test_a_state_dict_holds_the_base_weight_without_the_live_columns_and_round_trips(tokens):
    """A Trainer checkpoint, accelerate's save_state or a hand-written one: model.state_dict() loaded
    into a freshly attached model gives the trained model's logits (a live Δ would be added twice)."""
    model = lt.attach(lt.load_model("tiny-llama"), lt.PaCA(r=4, alpha=8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = model(tokens).logits  # the columns are placed now
    state = model.state_dict()
    pristine = lt.load_model("tiny-llama").state_dict()
    for name, value in state.items():
        if name.endswith("base_layer.weight"):
            torch.testing.assert_close(value, pristine[name.replace(".base_layer", "")], rtol=0, atol=0)
    fresh = lt.attach(lt.load_model("tiny-llama"), lt.PaCA(r=4, alpha=8)).eval()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(tokens).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)  # the model itself goes on as before


def test_a_cast_and_back_is_not_an_outside_write():
    torch.manual_seed(0)
    model = TwoLayer()
    w0 = model.up.weight.detach().clone()
    lt.attach(model, lt.PaCA(r=4, alpha=8, targets=["up"]))
    randomize_adapter(model, scale=0.5)
    x = torch.randn(5, 16)
    model(x)  # the columns are placed
    model.to(torch.bfloat16).to(torch.float32)
    layer = model.up
    expected, _ = dense_reference(x, w0, layer.base_module().bias.detach(), [(layer.paca_index, layer.paca_delta.detach(), 2.0)])
    torch.testing.assert_close(model.up(x), expected, rtol=2e-2, atol=2e-2)  # bf16 rounding of W0, nothing more
    lt.detach(model)
    torch.testing.assert_close(model.up.weight, w0.bfloat16().float(), rtol=0, atol=0)


def test_a_base_written_while_paca_is_merged_then_a_merge_above_keeps_all_three():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24)).double()
    lt.attach(model, lt.PaCA(r=4, alpha=8, targets=["0"]), adapter_name="p")
    lt.attach(model, lt.LoRA(r=2, alpha=4, targets=["0"]), adapter_name="l")
    randomize_adapter(model, scale=0.5)
    lora, paca = model[0], model[0].base_layer
    x = torch.randn(5, 16, dtype=torch.float64)
    lt.merge(model, "p")
    new = torch.randn(24, 16, dtype=torch.float64)
    with torch.no_grad():
        paca.base_module().weight.copy_(new)  # new base weights while PaCA is merged
    lt.merge(model, "l")
    weight = new.clone()
    weight[:, paca.paca_index] += paca.scale * paca.paca_delta.detach()
    weight += lora.delta_weight().detach()
    torch.testing.assert_close(model(x), F.linear(x, weight, paca.base_module().bias.detach()))
    lt.detach(model)
    torch.testing.assert_close(model[0].weight, new, rtol=0, atol=0)


def test_a_functional_call_with_another_base_weight_leaves_the_model_as_it_was():
    """torch.func.functional_call swaps the base weight for one call and back: the model's own
    weight keeps its accounts (its columns were not written from outside)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24)).double()
    w0, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    lt.attach(model, lt.PaCA(r=4, alpha=8, targets=["0"]))
    randomize_adapter(model, scale=0.5)
    layer = model[0]
    x = torch.randn(5, 16, dtype=torch.float64)
    model(x)
    other = w0 + 0.01
    with torch.no_grad():
        swapped = functional_call(model, {"0.base_layer.weight": other.clone()}, (x,))
    contributions = [(layer.paca_index, layer.paca_delta.detach(), 2.0)]
    torch.testing.assert_close(swapped, dense_reference(x, other, bias, contributions)[0])
    torch.testing.assert_close(model(x), dense_reference(x, w0, bias, contributions)[0])
    lt.detach(model)
    torch.testing.assert_close(model[0].weight, w0, rtol=0, atol=0)
