"""Helpers shared by several test files (fixtures live in conftest.py)."""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

import leantune as lt
from leantune.methods.lora import LoRALayer
from leantune.methods.paca import PaCALayer
from leantune.methods.sketch import SketchTune

IGNORE = -100

# SketchTune calibration text: short, repetitive code that a tiny model sketches in seconds.
CALIB_TEXT = "\n".join(
    f"def add_{i}(a, b):\n    return a + b * {i}\n\nassert add_{i}(1, 2) == {1 + 2 * i}\n" for i in range(60))


def sketch_config(calib_file, **kwargs):
    return SketchTune(calib=calib_file, samples=4, seq_len=48, **kwargs)


def _byte_ids() -> dict[int, int]:
    """Byte -> token id of the tiny models' byte-level tokenizer, written out independently of it.

    GPT-2's byte-to-unicode table maps the printable bytes to themselves and the other 68 bytes to
    chr(256 + n) in byte order; the vocabulary is those 256 characters sorted by code point.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    order = sorted(chars.values())
    return {b: order.index(c) for b, c in chars.items()}


BYTE_IDS = _byte_ids()


def byte_ids(text: str) -> list[int]:
    return [BYTE_IDS[b] for b in text.encode("utf-8")]


def pair_example(prompt: str, completion: str, eos: int) -> tuple[list[int], list[int]]:
    """Prompt/completion data by hand: loss on the completion and the end token, none on the prompt."""
    completion_ids = byte_ids(completion) + [eos]
    return byte_ids(prompt) + completion_ids, [IGNORE] * len(byte_ids(prompt)) + completion_ids


def chatml_example(messages: list[dict[str, str]], im_start: int, im_end: int) -> tuple[list[int], list[int]]:
    """A ChatML conversation by hand: each turn is `<|im_start|>role\\ncontent<|im_end|>\\n`; loss only on
    what an assistant turn writes after its `<|im_start|>assistant\\n` header."""
    ids: list[int] = []
    labels: list[int] = []
    for message in messages:
        header = [im_start] + byte_ids(message["role"] + "\n")
        body = byte_ids(message["content"]) + [im_end] + byte_ids("\n")
        ids += header + body
        labels += [IGNORE] * len(header) + (body if message["role"] == "assistant" else [IGNORE] * len(body))
    return ids, labels


def assert_matches_reference(out: torch.Tensor, expected: torch.Tensor,
                             gradients: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                             upstream: torch.Tensor | None = None) -> None:
    """`out` equals the dense reference `expected` (torch's default tolerances for the dtype); then
    one upstream gradient (random unless given) flows back through both, and each (got, want) pair
    that `gradients()` returns afterwards is equal too."""
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out) if upstream is None else upstream
    out.backward(upstream)
    expected.backward(upstream)
    for got, want in gradients():
        torch.testing.assert_close(got, want)


def relative_error(got, want) -> float:
    """‖got − want‖ / ‖want‖ in float64 (Frobenius norms)."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def check_bf16_autocast_against_dense_twin(model, tokens):
    """`model` (a tiny-llama with LoRA and/or PaCA attached) under CPU bf16 autocast against its
    dense twin under the same autocast: the same loss and the same adapter gradients up to bf16
    rounding; and the loss is within bf16 rounding of the float32 one, far closer than the adapter
    moves it."""
    twin, pairs = dense_twin(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, labels=tokens).loss
        expected = twin(tokens, labels=tokens).loss
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=0)
    loss.backward()
    expected.backward()
    params = dict(model.named_parameters())
    assert pairs.keys() == {n for n, p in params.items() if p.requires_grad}
    for name, reference in pairs.items():
        grad = params[name].grad
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert relative_error(grad, reference.grad) < 2e-2, name
    with torch.no_grad():
        full = float(model(tokens, labels=tokens).loss)
        with lt.disabled(model):
            base = float(model(tokens, labels=tokens).loss)
    assert abs(float(loss.detach()) - full) < 0.1 * abs(full - base)
    model.zero_grad()


def dense_twin(model, name="tiny-llama"):
    """A fresh `name` model whose LoRA / PaCA-adapted linears are replaced by plain modules that
    compute the method's formula from the original weight, with copies of the adapter tensors as
    their own parameters. Returns (twin, {adapter parameter name: twin parameter})."""
    class DenseLoRA(nn.Module):
        """W x + b + s (x Aᵀ) Bᵀ."""

        def __init__(self, linear, layer):
            super().__init__()
            self.linear, self.scale = linear, layer.scale
            self.a = nn.Parameter(layer.lora_A.detach().clone())
            self.b = nn.Parameter(layer.lora_B.detach().clone())

        def forward(self, x):
            return F.linear(x, self.linear.weight, self.linear.bias) + self.scale * (x @ self.a.t() @ self.b.t())

    class DensePaCA(nn.Module):
        """(W0 with s·Δ added to columns I) x + b, cast by autocast as any linear (as PaCA's is)."""

        def __init__(self, linear, layer):
            super().__init__()
            self.linear, self.scale, self.index = linear, layer.scale, layer.paca_index.clone()
            self.delta = nn.Parameter(layer.paca_delta.detach().clone())

        def forward(self, x):
            weight = self.linear.weight.index_add(1, self.index, self.scale * self.delta)
            return F.linear(x, weight, self.linear.bias)

    twin = lt.load_model(name)
    for param in twin.parameters():
        param.requires_grad_(False)
    pairs = {}
    for module_name, layer in list(model.named_modules()):
        if isinstance(layer, LoRALayer):
            dense = DenseLoRA(twin.get_submodule(module_name), layer)
            pairs.update({f"{module_name}.lora_A": dense.a, f"{module_name}.lora_B": dense.b})
        elif isinstance(layer, PaCALayer):
            dense = DensePaCA(twin.get_submodule(module_name), layer)
            pairs[f"{module_name}.paca_delta"] = dense.delta
        else:
            continue
        parent, _, child = module_name.rpartition(".")
        setattr(twin.get_submodule(parent), child, dense)
    return twin, pairs


def assert_one_line_user_error(err: str, verb: str, sentence: str) -> None:
    """A CLI user error: stderr is exactly `leantune VERB: error: <sentence>` on one line (sentence: a
    regular expression for the whole message), without a traceback."""
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    prefix = f"leantune {verb}: error: "
    assert err.startswith(prefix), err
    assert re.fullmatch(sentence, err[len(prefix):-1]), err


def sharp_model():
    """tiny-llama with larger random weights, so greedy continuations vary from token to token."""
    model = lt.load_model("tiny-llama")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3, generator=generator)
    return model


def bos_adding_tokenizer():
    """tiny-llama's tokenizer made to add a BOS token '<s>' to every text, as Llama's does; and its id."""
    from tokenizers import processors

    tokenizer = lt.load_tokenizer("tiny-llama")
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tokenizer, bos
