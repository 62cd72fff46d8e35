"""The methods on the architectures people fine-tune, as tiny random models: Llama, Qwen2 (biases
on q/k/v), Mistral, Phi3 (fused qkv_proj / gate_up_proj), Gemma 2 (logit soft-capping), Qwen3 and
GPT-2 (Conv1D layers, weights stored [in, out]).

Per architecture and method: the forward and the adapter's gradients against a dense reference
(the plain model run with W' built by hand from the adapter's tensors), merge, save/load, the PEFT
export read by the real `peft`, and for GPT-2 the merged export reloaded by `transformers` and
detach giving back Conv1D layers.
"""
from __future__ import annotations

import peft
import pytest
import torch
import transformers as tf
from torch.func import functional_call

import leantune as lt
from conftest import randomize_adapter
from leantune.loss import causal_lm_loss, check_packed_rows_stay_apart, count_loss_tokens
from leantune.methods.layer import named_adapter_layers
from leantune.methods.targets import LinearFromConv1D

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, max_position_embeddings=256)
ARCHITECTURES = {
    "llama": lambda: tf.LlamaConfig(**SMALL),
    "qwen2": lambda: tf.Qwen2Config(**SMALL),
    "mistral": lambda: tf.MistralConfig(**SMALL),
    "phi3": lambda: tf.Phi3Config(**SMALL, pad_token_id=0),
    "gemma2": lambda: tf.Gemma2Config(**SMALL, head_dim=16),
    "qwen3": lambda: tf.Qwen3Config(**SMALL, head_dim=16),
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=256),
}
# IA3's Llama-style defaults do not exist on fused or GPT-2 names: the targets a user sets there.
IA3_TARGETS = {"phi3": dict(targets=["qkv_proj", "down_proj"], feedforward=["down_proj"]),
               "gpt2": dict(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"])}
METHODS = {
    "lora": lambda arch: lt.LoRA(r=4, alpha=8),
    "dora": lambda arch: lt.DoRA(r=4, alpha=8),
    "paca": lambda arch: lt.PaCA(r=4, alpha=8),
    "ia3": lambda arch: lt.IA3(**IA3_TARGETS.get(arch, {})),
    "lora-fa": lambda arch: lt.LoRA(r=4, alpha=8, freeze_a=True),
}
CELLS = [(a, m) for a in ARCHITECTURES for m in METHODS]
# The methods without a dense weight to compare with: their own references below.
# Bottleneck adapters wrap sublayers; GPT-2's are attn and mlp, not the Llama-style names.
SUBLAYERS = {"gpt2": dict(targets=["attn", "mlp"])}
OTHER_METHODS = {
    "prompt": lambda arch: lt.PromptTuning(num_virtual_tokens=3),
    "prefix": lambda arch: lt.PrefixTuning(num_virtual_tokens=3),
    "adapter": lambda arch: lt.Adapter(bottleneck=8, where="both", **SUBLAYERS.get(arch, {})),
    "mam": lambda arch: [lt.PrefixTuning(num_virtual_tokens=3),
                         lt.Adapter(bottleneck=8, placement="parallel",
                                    **({"targets": ["mlp"]} if arch == "gpt2" else {}))],
    "bitfit": lambda arch: lt.BitFit(add_bias=True),
    "full": lambda arch: lt.Full(keep_base=True),
}
# Gemma 2 alternates sliding-window and full attention: prefixes are refused there, in one sentence.
REFUSED = {("gemma2", "prefix"), ("gemma2", "mam")}
OTHER_CELLS = [(a, m) for a in ARCHITECTURES for m in OTHER_METHODS]
CLOSE = dict(atol=2e-5, rtol=1e-4)


def build(arch):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(ARCHITECTURES[arch]()).eval()


def attached(arch, method):
    model = build(arch)
    torch.manual_seed(1)
    lt.attach(model, METHODS[method](arch))
    randomize_adapter(model, scale=0.1)
    return model


def dense_tensors(layer, original) -> dict[str, torch.Tensor]:
    """W' (and b') of one adapted module from the adapter's tensors and the original module, differentiably,
    in nn.Linear layout (PaCA writes its columns into the base weight, so W0 comes from the untouched copy)."""
    conv = isinstance(layer.base_module(), LinearFromConv1D)
    w = original.weight.detach().t() if conv else original.weight.detach()
    b = None if original.bias is None else original.bias.detach()
    name = type(layer).__name__
    if name == "PaCALayer":
        w = w.index_add(1, layer.paca_index, layer.scale * layer.paca_delta)
    elif name in ("LoRALayer", "DoRALayer"):
        w = w + layer.scale * layer.lora_B @ layer.lora_A
        if name == "DoRALayer":  # the norm is a constant in backward (DoRA's section 4.3, as PEFT does)
            w = (layer.magnitude / w.norm(dim=1).detach())[:, None] * w
    elif name == "IA3Layer":
        if layer.feedforward:
            w = w * layer.ia3_l[None, :]
        else:
            w = w * layer.ia3_l[:, None]
            b = None if b is None else b * layer.ia3_l
    return {"weight": w, "bias": b}


def reference_logits(arch, model, ids):
    """The plain model (a fresh copy of the base) with every adapted module's weights replaced by W'."""
    plain = build(arch)
    replaced = {}
    for module_name, layer in named_adapter_layers(model):
        for key, tensor in dense_tensors(layer, plain.get_submodule(module_name)).items():
            if tensor is None:
                continue
            if isinstance(layer.base_module(), LinearFromConv1D):
                tensor = tensor.t()  # Conv1D keeps [in, out]
            replaced[f"{module_name}.{key}"] = tensor
    return functional_call(plain, replaced, (ids,)).logits


@pytest.mark.parametrize("arch, method", CELLS)
def test_forward_and_gradients_equal_the_dense_reference(arch, method):
    model = attached(arch, method)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(2))
    logits = model(ids).logits
    reference = reference_logits(arch, model, ids)
    torch.testing.assert_close(logits, reference, **CLOSE)
    params = [p for p in model.parameters() if p.requires_grad]
    labels = ids.clone()
    got = torch.autograd.grad(causal_lm_loss(model, ids, labels), params)
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(
        reference[:, :-1].reshape(-1, reference.shape[-1]), labels[:, 1:].reshape(-1)), params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("arch, method", CELLS)
def test_merge_save_load_and_the_peft_export(arch, method, tmp_path):
    model = attached(arch, method)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    adapted = model(ids).logits
    lt.save_adapter(model, tmp_path / "adapter")
    reloaded = lt.load_adapter(build(arch), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(ids).logits, adapted, atol=0, rtol=0)
    lt.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(theirs(ids).logits, adapted, **CLOSE)
    imported = lt.import_peft(build(arch), tmp_path / "peft")
    torch.testing.assert_close(imported(ids).logits, adapted, **CLOSE)
    lt.merge(model)
    torch.testing.assert_close(model(ids).logits, adapted, **CLOSE)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if (a, "prefix") not in REFUSED])
def test_prefixes_started_from_tokens_equal_the_base_model_reading_those_tokens_first(arch):
    """Positions included: GPT-2's absolute ones, the others' rotary ones, all continue after the prefix."""
    base = build(arch)
    model = lt.attach(build(arch), lt.PrefixTuning(num_virtual_tokens=3, init="vocab", seed=2))
    start = torch.randint(0, 512, (3,), generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    expected = base(torch.cat([start.expand(2, -1), ids], dim=1)).logits[:, 3:]
    torch.testing.assert_close(model(ids).logits, expected, **CLOSE)


@pytest.mark.parametrize("arch, method", OTHER_CELLS)
def test_the_other_methods_train_save_reload_and_switch_off_on_every_architecture(arch, method, tmp_path):
    base = build(arch)
    model = build(arch)
    torch.manual_seed(1)
    if (arch, method) in REFUSED:
        with pytest.raises(lt.LeantuneError, match="prefix tuning needs full attention in every layer; this gemma2 "
                                                   "model also has sliding_attention layers"):
            lt.attach(model, OTHER_METHODS[method](arch))
        return
    lt.attach(model, OTHER_METHODS[method](arch))
    randomize_adapter(model, scale=0.02 if method == "full" else 0.1)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    adapted = model(ids).logits
    assert adapted.shape == base(ids).logits.shape  # virtual tokens and prefixes leave no positions behind
    assert not torch.allclose(adapted, base(ids).logits, atol=1e-4)
    with lt.disabled(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
    if method == "prompt":  # the plain model given the same tensor in front of its input embeddings
        prompt = next(p for p in model.parameters() if p.requires_grad)
        embeds = torch.cat([prompt[None].expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
        torch.testing.assert_close(adapted, base(inputs_embeds=embeds).logits[:, 3:], **CLOSE)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(causal_lm_loss(model, ids, ids), params)
    assert all(torch.isfinite(g).all() for g in grads) and sum(bool(g.abs().sum() > 0) for g in grads) == len(grads)
    if method in ("prompt", "prefix", "mam"):  # the KV cache holds virtual tokens / prefixes: with it = without
        options = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
        cached = model.generate(ids, use_cache=True, **options)
        torch.testing.assert_close(cached, model.generate(ids, use_cache=False, **options), atol=0, rtol=0)
    lt.save_adapter(model, tmp_path / "adapter")
    reloaded = lt.load_adapter(build(arch), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(ids).logits, adapted, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora", "paca", "ia3"])
def test_gpt2_merged_export_reloads_in_transformers_and_detach_restores_conv1d(method, tmp_path):
    model = attached("gpt2", method)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(4))
    adapted = model(ids).logits
    lt.save_merged_model(model, tmp_path / "merged")
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(ids).logits, adapted, **CLOSE)
    lt.detach(model)
    torch.testing.assert_close(model(ids).logits, build("gpt2")(ids).logits, atol=0, rtol=0)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_ia3_defaults_on_fused_names_name_the_architecture_and_the_keys():
    with pytest.raises(lt.LeantuneError, match=r"which Phi3ForCausalLM does not have; set targets=\[...\] and "
                                               r"feedforward=\[...\], the config keys method.targets"):
        lt.attach(build("phi3"), lt.IA3())


def packed_batch(lengths_per_row, vocab=512, seed=0):
    """Collated packed rows of random examples (every token labelled), and the examples per row."""
    from leantune.data import Example, collate, pack

    generator = torch.Generator().manual_seed(seed)
    rows, examples = [], []
    for lengths in lengths_per_row:
        these = [Example(ids, list(ids)) for ids in
                 (torch.randint(vocab, (n,), generator=generator).tolist() for n in lengths)]
        (row,) = pack(these, sum(lengths))
        rows.append(row)
        examples.append(these)
    return collate(rows, pad_id=0), examples


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("chunked", [False, True])
def test_packed_examples_compute_as_each_alone(arch, chunked):
    """A packed row's loss and gradients equal those of its examples run one by one (sum of their
    token losses over the same count), padding included: no packed example sees another."""
    model = attached(arch, "lora")
    if chunked and arch == "gemma2":
        chunked = None  # soft-capped logits: the chunked loss is refused there, auto falls back
    check_packed_rows_stay_apart(model)
    batch, examples = packed_batch([[5, 7, 4], [9, 3]])
    trainable = [p for p in model.parameters() if p.requires_grad]
    count = count_loss_tokens(batch["labels"]) + 0.0
    packed = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"], chunked=chunked,
                            num_items=count, position_ids=batch["position_ids"])
    packed_grads = torch.autograd.grad(packed, trainable)
    alone = sum(causal_lm_loss(model, torch.tensor([e.input_ids]), torch.tensor([e.labels]), chunked=chunked,
                               num_items=count) for row in examples for e in row)
    alone_grads = torch.autograd.grad(alone, trainable)
    torch.testing.assert_close(packed, alone, **CLOSE)
    for got, want in zip(packed_grads, alone_grads):
        torch.testing.assert_close(got, want, **CLOSE)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_packing_is_refused_where_virtual_tokens_stand_before_a_row_only(method):
    model = build("llama")
    lt.attach(model, OTHER_METHODS[method]("llama"))
    with pytest.raises(lt.LeantuneError, match="config key 'packing'.*set packing: false"):
        check_packed_rows_stay_apart(model)
