"""Float32 products through oneDNN (`leantune/kernels.py`): the same numbers as float64, the same
gradients, torch's own path wherever oneDNN must not run, and whole methods unchanged by it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leantune as lt
from leantune import kernels
from leantune.loss import causal_lm_loss
from leantune.methods.layer import adapter_layers

pytestmark = pytest.mark.skipif(not kernels.available(), reason="this PyTorch build has no oneDNN")


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("shape", [(8, 576, 1536), (3, 70, 1536, 576), (207, 1536, 576)])
def test_products_equal_float64_to_float32_rounding(shape):
    *rows, k, n = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*rows, k, generator=generator)
    weight, bias = torch.randn(n, k, generator=generator), torch.randn(n, generator=generator)
    assert kernels._takes(x, weight, bias)
    want = x.double() @ weight.double().t() + bias.double()
    assert _relative(kernels.linear(x, weight, bias), want) < 1e-5
    g = torch.randn(*rows, n, generator=generator)
    assert _relative(kernels.matmul(g, weight), g.double() @ weight.double()) < 1e-5
    # a transposed (non-contiguous) operand, as backward passes them
    assert _relative(kernels.matmul(g.reshape(-1, n).t(), x.reshape(-1, k)),
                     g.reshape(-1, n).double().t() @ x.reshape(-1, k).double()) < 1e-5


def test_gradients_equal_float64_autograd():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, 256, generator=generator, requires_grad=True)
    weight = torch.randn(512, 256, generator=generator, requires_grad=True)
    bias = torch.randn(512, generator=generator, requires_grad=True)
    g = torch.randn(4, 64, 512, generator=generator)
    kernels.linear(x, weight, bias).backward(g)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    F.linear(*leaves).backward(g.double())
    for got, want in zip((x.grad, weight.grad, bias.grad), leaves):
        assert _relative(got, want.grad) < 1e-5


def test_compiled_code_reaches_onednn_through_the_custom_op_with_the_same_numbers(monkeypatch):
    """Inductor cannot lower oneDNN's call itself: compiled code calls it as the op leantune::linear."""
    monkeypatch.setattr(kernels, "MIN_MACS", 0)
    calls = []
    monkeypatch.setattr(kernels, "_onednn", lambda *args: calls.append(1) or kernels._onednn_op()(*args, "none", [], ""))
    torch.manual_seed(0)
    model = nn.Sequential(kernels.FastLinear(64, 128), nn.SiLU(), kernels.FastLinear(128, 64))
    x = torch.randn(8, 64, requires_grad=True)
    runs, counts = [], []
    for run in (model, torch.compile(model)):
        model.zero_grad()
        x.grad = None
        calls.clear()
        y = run(x)
        y.square().sum().backward()
        runs.append([y.detach(), x.grad.clone(), model[0].weight.grad.clone(), model[2].bias.grad.clone()])
        counts.append(len(calls))
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counts == [6, 6]  # two products forward, an input and a weight gradient for each backward


def test_a_second_derivative_raises_rather_than_missing_terms():
    x = torch.randn(64, 256, requires_grad=True)
    weight = torch.randn(512, 256, requires_grad=True)
    (grad_x,) = torch.autograd.grad(kernels.linear(x, weight).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()


def test_torch_runs_wherever_onednn_must_not():
    x, weight = torch.randn(64, 256), torch.randn(512, 256)
    assert kernels._takes(x, weight, None)
    assert not kernels._takes(x.double(), weight.double(), None)
    assert not kernels._takes(x[:1, :8], weight[:8, :8], None)  # too small to repay the call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels._takes(x, weight, None)
        assert kernels.linear(x, weight).dtype == torch.bfloat16  # autocast's cast, as nn.Linear's
    assert not kernels._takes(x, weight[:, :1].expand(512, 256), None)  # strides oneDNN is not handed
    assert not kernels._takes(x, weight, torch.randn(1))  # a bias F.linear would broadcast
    with kernels.torch_products():  # what the FLOP counter's runs use: it sees torch's ops only
        assert not kernels._takes(x, weight, None)
    assert kernels._takes(x, weight, None)
    for key in ("torch", "TORCH "):
        script = "from leantune import kernels; print(kernels.available())"
        out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "LEANTUNE_GEMM": key},
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == "False"


def test_onednn_caches_are_capped_unless_the_user_set_them():
    """Uncapped, oneDNN's caches grew the demo job's peak by 570 MiB (batches of many lengths)."""
    script = "import os, leantune.kernels; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["64", "64"]
    env["LRU_CACHE_CAPACITY"] = "512"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["64", "512"]


def test_fast_linears_keep_parameters_keys_and_subclasses():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(256, 512), Custom(512, 512), nn.Sequential(nn.Linear(512, 256, bias=False)))
    keys, params = list(model.state_dict()), [p for p in model.parameters()]
    x = torch.randn(64, 256)
    want = model(x)
    assert kernels.use_fast_linears(model) == 2
    assert [type(m) for m in (model[0], model[1], model[2][0])] == [kernels.FastLinear, Custom, kernels.FastLinear]
    assert list(model.state_dict()) == keys and all(a is b for a, b in zip(model.parameters(), params))
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model[0].weight.data.mul_(-1)  # read at every call: a `.data` write shows at once
    torch.testing.assert_close(model[0](x), F.linear(x, model[0].weight, model[0].bias), rtol=1e-5, atol=1e-5)


def _loss_and_grads(method, force_onednn: bool, monkeypatch, model_name: str = "tiny-llama"
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    monkeypatch.setattr(kernels, "MIN_MACS", 0 if force_onednn else kernels.MIN_MACS)
    if not force_onednn:
        monkeypatch.setattr(kernels, "_onednn_op", lambda: None)
    torch.manual_seed(0)
    model = lt.load_model(model_name)
    lt.attach(model, method)
    with torch.no_grad():  # every trainable tensor random (a zero B would hide half of LoRA)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    model.train()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    loss = causal_lm_loss(model, ids, ids, chunked=True)
    loss.backward()
    monkeypatch.undo()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", [lt.LoRA(r=4, targets="all-linear"), lt.DoRA(r=4), lt.PaCA(r=4),
                                    lt.Full()], ids=lambda m: type(m).__name__)
def test_methods_train_the_same_through_onednn(method, monkeypatch):
    """Every product of these methods (the base, their own GEMMs, the chunked head) forced through
    oneDNN gives the loss and gradients of torch's own path."""
    loss, grads = _loss_and_grads(method, True, monkeypatch)
    want_loss, want_grads = _loss_and_grads(method, False, monkeypatch)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_biased_projections_train_the_same_through_onednn(monkeypatch):
    """Qwen2's q/k/v carry biases: LoRA's fused path hands them to oneDNN's product."""
    method = lt.LoRA(r=4, targets="all-linear")
    loss, grads = _loss_and_grads(method, True, monkeypatch, "tiny-qwen2")
    want_loss, want_grads = _loss_and_grads(method, False, monkeypatch, "tiny-qwen2")
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mixed_adapter_rows_through_onednn_equal_each_row_alone(monkeypatch):
    monkeypatch.setattr(kernels, "MIN_MACS", 0)
    model = lt.load_model("tiny-llama")
    for name, seed in (("a", 1), ("b", 2)):
        lt.attach(model, lt.LoRA(r=4), adapter_name=name)
        with torch.no_grad():
            for layer in adapter_layers(model, name):
                layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(seed)))
    ids = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    rows = ["a", None, "b"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            lt.use(model, name)
            torch.testing.assert_close(mixed[i], model(ids[i:i + 1]).logits[0], rtol=1e-5, atol=1e-5)
