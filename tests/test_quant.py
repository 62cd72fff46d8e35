import copy

import pytest
import torch
import torch.nn.functional as F

import leantune as lt
from conftest import randomize_adapter
from helpers import assert_matches_reference
from leantune.methods.dora import DoRA
from leantune.methods.layer import dense_weight
from leantune.methods.paca import PaCALayer
from leantune.quant import NF4Linear

# The 16 NF4 levels (QLoRA, appendix E), as multiples of a block's absmax; blocks of 64 weights.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
# Rounding to the nearest level moves a weight by at most half the widest gap (between -1 and
# -0.696: 0.1519) times the block's absmax.
NF4_HALF_GAP = float(NF4_LEVELS.diff().max()) / 2
# Double quantization stores each absmax in 8 bits around the mean of its group of 256: for these
# layers that changes it by < 0.1% (0.08% measured); allowed: 0.2% of absmax.
DOUBLE_QUANT_SCALE_ERROR = 2e-3


def nf4_uniform_relative_rms() -> float:
    """RMS error / RMS of Uniform(-a, a) weights rounded to the nearest level times a (nn.Linear
    weights are uniform; a block's absmax is close to a): 0.0935."""
    u = torch.linspace(-1, 1, 200_001, dtype=torch.float64)
    error = (u[:, None] - NF4_LEVELS.double()[None]).abs().min(1).values
    return float(error.pow(2).mean().sqrt() / (1 / 3) ** 0.5)


def align16(nbytes: int) -> int:
    return -(-nbytes // 16) * 16


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Packed size: 4-bit codes, one absmax per 64 weights (8-bit with double quantization, with a
    float32 scale per 256 absmax and one float32 offset; else float32), each section 16-byte aligned."""
    blocks = numel // 64
    if not double_quant:
        return align16(numel // 2) + align16(4 * blocks)
    return align16(numel // 2) + align16(blocks) + align16(4 * -(-blocks // 256)) + align16(4)


def saved_bytes(fn):
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        out = fn()
    return out, sum(sizes)


def dequantized_copy(model, config):
    """The reference: a fresh tiny-llama whose adapted linears hold the dequantized weights, carrying
    the same adapter (same config without quantize, same tensors)."""
    reference = lt.load_model("tiny-llama")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, NF4Linear):
                reference.get_submodule(name.replace(".base_layer", "")).weight.copy_(module.dequantize_weight())
    dense_config = copy.deepcopy(config)
    dense_config.quantize = None
    lt.attach(reference, dense_config)
    dense_config.load_state_dict(reference, "default", config.state_dict(model, "default"))
    return reference


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_linear_error_and_bytes(double_quant):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 192)
    quantized = NF4Linear(linear, double_quant=double_quant)
    weight = quantized.dequantize_weight()
    assert weight.shape == linear.weight.shape and weight.dtype == torch.float32
    original = linear.weight.detach()
    blocks, dequantized = original.reshape(-1, 64), weight.reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)

    # every weight is its block's scale times the level nearest to weight / absmax (a quantizer
    # written out here); the scale is the absmax itself, or its 8-bit double-quantized copy
    scale = dequantized.abs().amax(1, keepdim=True)  # the ±absmax weight maps to level ±1
    if double_quant:
        assert ((scale / absmax - 1).abs() <= DOUBLE_QUANT_SCALE_ERROR).all()
    else:
        assert torch.equal(scale, absmax)
    nearest = (blocks[:, :, None] / absmax[:, :, None] - NF4_LEVELS).abs().argmin(-1)
    assert torch.equal(dequantized, NF4_LEVELS[nearest] * scale)

    error = (dequantized - blocks).abs()
    allowed = (NF4_HALF_GAP + (DOUBLE_QUANT_SCALE_ERROR if double_quant else 1e-6)) * absmax
    assert (error <= allowed).all()
    relative_rms = float((weight - original).pow(2).mean().sqrt() / original.pow(2).mean().sqrt())
    assert 0.95 * nf4_uniform_relative_rms() < relative_rms < 1.02 * nf4_uniform_relative_rms()  # 0.0912 measured

    assert quantized.weight.dtype == torch.uint8
    assert quantized.weight.numel() == nf4_bytes(192 * 256, double_quant) == (25376 if double_quant else 27648)
    assert torch.equal(dense_weight(quantized), weight)


def test_nf4_forward_backward_match_dequantized_reference_and_save_no_weight():
    torch.manual_seed(0)
    quantized = NF4Linear(torch.nn.Linear(32, 24))
    x = torch.randn(3, 5, 32, requires_grad=True)
    out, nbytes = saved_bytes(lambda: quantized(x))
    assert nbytes == 0  # the dense weight is rebuilt in backward, never kept
    x_ref = x.detach().clone().requires_grad_(True)
    expected = F.linear(x_ref, quantized.dequantize_weight(), quantized.bias)
    assert_matches_reference(out, expected, lambda: [(x.grad, x_ref.grad)])


def test_nf4_keeps_float64_and_follows_casts():
    linear = torch.nn.Linear(64, 16).double()
    quantized = NF4Linear(linear)
    assert quantized.dequantize_weight().dtype == torch.float64
    packed = quantized.weight.clone()
    quantized.half()
    assert quantized.dequantize_weight().dtype == torch.float16 and quantized.bias.dtype == torch.float16
    assert torch.equal(quantized.weight, packed)  # the packed state is never cast


def test_qpaca_matches_dequantized_reference(tiny_llama, tokens):
    config = lt.PaCA(r=8, alpha=16, quantize="nf4")
    lt.attach(tiny_llama, config)
    assert all(isinstance(layer.base_layer, NF4Linear) for layer in tiny_llama.modules() if isinstance(layer, PaCALayer))
    randomize_adapter(tiny_llama)
    reference = dequantized_copy(tiny_llama, config)
    out = tiny_llama(tokens, labels=tokens)
    expected = reference(tokens, labels=tokens)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    got = {n: p.grad for n, p in tiny_llama.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_qpaca_is_close_to_full_precision_paca(tiny_llama, tokens):
    dense = copy.deepcopy(tiny_llama)
    lt.attach(dense, lt.PaCA(r=8, alpha=16))
    lt.attach(tiny_llama, lt.PaCA(r=8, alpha=16, quantize="nf4"))
    randomize_adapter(dense)
    randomize_adapter(tiny_llama)
    got, want = tiny_llama(tokens).logits, dense(tokens).logits
    # 9% RMS weight error in every projection moves the logits by 4.8% of their spread (measured)
    assert (got - want).pow(2).mean().sqrt() < 0.06 * want.std()


def test_qpaca_saves_only_x_columns_and_nothing_dense():
    layer_model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    lt.attach(layer_model, lt.PaCA(r=4, quantize="nf4", targets=["0"]))
    x = torch.randn(2, 7, 64, requires_grad=True)
    out, nbytes = saved_bytes(lambda: layer_model(x))
    assert nbytes == 2 * 7 * 4 * 4
    out.sum().backward()
    assert layer_model[0].paca_delta.grad is not None and x.grad is not None


def test_qpaca_to_lora(tiny_llama, tokens):
    lt.attach(tiny_llama, lt.PaCA(r=4, alpha=8, quantize="nf4", targets=["v_proj", "up_proj"]))
    randomize_adapter(tiny_llama)
    expected = tiny_llama(tokens).logits
    lt.paca_to_lora(tiny_llama)
    assert lt.attached(tiny_llama)["default"].quantize == "nf4"
    torch.testing.assert_close(tiny_llama(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_qlora_matches_dequantized_reference(tiny_llama, tokens):
    torch.manual_seed(0)  # LoRA's A is drawn from the global generator
    config = lt.LoRA(r=4, alpha=8, quantize="nf4")
    lt.attach(tiny_llama, config)
    randomize_adapter(tiny_llama)
    reference = dequantized_copy(tiny_llama, config)
    out = tiny_llama(tokens, labels=tokens)
    expected = reference(tokens, labels=tokens)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    for (name, got), (_, want) in zip(
            ((n, p) for n, p in tiny_llama.named_parameters() if p.requires_grad),
            ((n, p) for n, p in reference.named_parameters() if p.requires_grad)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_qdora_matches_dequantized_reference(tiny_llama, tokens):
    config = DoRA(r=4, alpha=8, quantize="nf4")
    lt.attach(tiny_llama, config)
    randomize_adapter(tiny_llama)
    reference = dequantized_copy(tiny_llama, config)
    torch.testing.assert_close(tiny_llama(tokens).logits, reference(tokens).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [lt.LoRA(r=4, alpha=8, quantize="nf4"), lt.PaCA(r=4, quantize="nf4")])
def test_merging_into_a_4bit_base_needs_requantize_and_unmerge_restores_it(tiny_llama, tokens, config):
    """Merging rounds the update into 4 bits: refused in one sentence unless asked for; the dense
    merged export stays exact."""
    lt.attach(tiny_llama, config)
    randomize_adapter(tiny_llama)
    tiny_llama.eval()
    with torch.no_grad():
        adapted = tiny_llama(tokens).logits
        with pytest.raises(lt.LeantuneError, match="4-bit base: merging rounds its update"):
            lt.merge(tiny_llama)
        with pytest.raises(lt.LeantuneError, match="requantize=True"):
            lt.detach(copy.deepcopy(tiny_llama), keep_merged=True)
        torch.testing.assert_close(tiny_llama(tokens).logits, adapted, rtol=0, atol=0)  # nothing merged
        lt.merge(tiny_llama, requantize=True)
        assert (tiny_llama(tokens).logits - adapted).abs().max() > 1e-4  # rounded, as it said
        lt.unmerge(tiny_llama)
        torch.testing.assert_close(tiny_llama(tokens).logits, adapted, rtol=0, atol=0)


def test_summary_reports_nf4_base_bytes(tiny_llama):
    lt.attach(tiny_llama, lt.PaCA(r=4, quantize="nf4"))
    info = lt.summary(tiny_llama)["base_weight_bytes"]
    modules = [m for m in tiny_llama.modules() if isinstance(m, NF4Linear)]
    dense = sum(m.in_features * m.out_features * 4 for m in modules)
    assert len(modules) == 14 and info["fp32"] == dense and info["fp16"] == dense // 2
    assert info["stored"] == sum(nf4_bytes(m.in_features * m.out_features) for m in modules)


def test_quantizing_what_cannot_be_quantized_is_an_error(tiny_llama):
    lt.attach(tiny_llama, lt.LoRA(r=2, targets=["q_proj"]), "full")
    with pytest.raises(lt.LeantuneError, match="cannot quantize 'model.layers.0.self_attn.q_proj'"):
        lt.attach(tiny_llama, lt.PaCA(r=2, quantize="nf4", targets=["q_proj"]), "quantized")
    with pytest.raises(lt.LeantuneError, match="'init' 'pissa'|init 'pissa'"):
        lt.LoRA(init="pissa", quantize="nf4")


# The one skip in the suite: the development and CI machines have no GPU, and this compares the
# CUDA path against the CPU one, which needs one.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qpaca_on_cuda_matches_cpu(tokens):
    cpu = lt.load_model("tiny-llama")
    lt.attach(cpu, lt.PaCA(r=4, quantize="nf4"))
    randomize_adapter(cpu)
    gpu = copy.deepcopy(cpu).cuda()
    expected = cpu(tokens).logits
    got = gpu(tokens.cuda()).logits.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    gpu(tokens.cuda(), labels=tokens.cuda()).loss.backward()
    assert all(p.grad is not None for p in gpu.parameters() if p.requires_grad)
