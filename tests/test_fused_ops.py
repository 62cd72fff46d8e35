"""The fused RMSNorm and SwiGLU forwards: the same function as the modules they replace, forward and back."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import leantune as lt
from conftest import randomize_adapter
from leantune.fused_ops import _RMSNorm, _SiluMul, fuse_norms_and_mlps, unfuse
from leantune.loss import causal_lm_loss

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=256)


def test_rms_norm_forward_and_gradients_equal_the_float64_formula():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 48, generator=generator, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(48, generator=generator)).requires_grad_()
    grad = torch.randn(3, 5, 48, generator=generator)
    y = _RMSNorm.apply(x, weight, 1e-5)
    y.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    reference = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    reference.backward(grad.double())
    torch.testing.assert_close(y, reference.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad, w64.grad.float(), atol=1e-5, rtol=1e-4)


def test_silu_mul_forward_and_gradients_equal_the_float64_formula():
    generator = torch.Generator().manual_seed(1)
    gate = (3 * torch.randn(4, 7, 32, generator=generator)).requires_grad_()
    up = torch.randn(4, 7, 32, generator=generator, requires_grad=True)
    grad = torch.randn(4, 7, 32, generator=generator)
    _SiluMul.apply(gate, up).backward(grad)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    reference = g64 / (1 + torch.exp(-g64)) * u64
    reference.backward(grad.double())
    torch.testing.assert_close(_SiluMul.apply(gate, up), reference.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gate.grad, g64.grad.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(up.grad, u64.grad.float(), atol=1e-5, rtol=1e-4)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, ids, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("method", ["lora", "paca", "full"])
def test_a_fused_model_trains_as_the_unfused_one(arch, method):
    """Loss and every trainable gradient (norm weights included under full fine-tuning) as before."""
    config = {"llama": tf.LlamaConfig, "qwen3": tf.Qwen3Config, "phi3": tf.Phi3Config}[arch](
        **SMALL, **({"pad_token_id": 0} if arch == "phi3" else {}))
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    lt.attach(model, {"lora": lt.LoRA(r=4, alpha=8, dropout=0.0), "paca": lt.PaCA(r=4, alpha=8),
                      "full": lt.Full()}[method])
    randomize_adapter(model)
    model.train()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    expected_loss, expected = _loss_and_grads(model, ids)
    layers = config.num_hidden_layers
    assert fuse_norms_and_mlps(model) == layers * 3 + 1 + (2 * layers if arch == "qwen3" else 0) - (
        layers if arch == "phi3" else 0)  # phi3's MLP is fused gate_up_proj: left as it is
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    unfuse(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_modules_that_compute_something_else_keep_their_forward():
    """Gemma's norms scale by 1 + weight and its MLP uses GELU: nothing there is switched."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.Gemma2Config(**SMALL, head_dim=16))
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            torch.nn.init.normal_(module.weight, std=0.5)  # Gemma starts them at zero, where 1 + w = w + 1 trivially
    assert fuse_norms_and_mlps(model) == 0


class _ClampedMLP(torch.nn.Module):
    """A SwiGLU that clamps its gate (as some Hugging Face MLPs do): equal to the plain one on small inputs."""

    def __init__(self, width=16, hidden=32, limit=10.0):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(width, hidden), torch.nn.Linear(width, hidden)
        self.down_proj, self.act_fn, self.limit = torch.nn.Linear(hidden, width), torch.nn.SiLU(), limit

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x).clamp(max=self.limit)) * self.up_proj(x))


class _DropoutMLP(_ClampedMLP):
    def forward(self, x):
        return torch.nn.functional.dropout(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)), 0.1,
                                           self.training)


class _PlainMLP(_ClampedMLP):
    def forward(self, hidden_state):
        """The canonical form, under another argument name and with a docstring."""
        out = self.down_proj(self.act_fn(self.gate_proj(hidden_state)) * self.up_proj(hidden_state))
        return out


def test_only_mlps_whose_forward_is_the_plain_gated_expression_are_switched():
    torch.manual_seed(0)
    for module in (_ClampedMLP(), _DropoutMLP()):
        assert fuse_norms_and_mlps(module) == 0, type(module).__name__
    assert fuse_norms_and_mlps(_PlainMLP()) == 1


def test_a_copy_of_a_fused_model_runs_its_own_modules(tiny_llama):
    import copy

    fuse_norms_and_mlps(tiny_llama)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    expected = tiny_llama(ids).logits
    other = copy.deepcopy(tiny_llama)
    torch.testing.assert_close(other(ids).logits, expected, atol=0, rtol=0)
    assert all(module.forward.__self__ is module for module in other.modules() if "forward" in module.__dict__)


def test_dropout_in_training_mode_does_not_hide_a_gated_mlp_and_training_mode_is_kept(tiny_llama):
    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8, dropout=0.5))
    tiny_llama.train()
    assert fuse_norms_and_mlps(tiny_llama) > tiny_llama.config.num_hidden_layers * 2
    assert all(m.training for m in tiny_llama.modules())


def test_other_dtypes_run_the_modules_own_forward(tiny_llama):
    fuse_norms_and_mlps(tiny_llama)
    model = tiny_llama.to(torch.float64)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    fused = model(ids).logits
    unfuse(model)
    torch.testing.assert_close(fused, model(ids).logits, atol=0, rtol=0)
