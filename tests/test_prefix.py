"""Prefix tuning against a reference built by hand (the plain model given the same keys and values in a
DynamicCache of its own, and the mask extended in front), against generation without the cache, and
against the real `peft` package in both directions. Tiny-llama and tiny-qwen2 both use grouped-query
attention (4 query heads, 2 key/value heads of 16)."""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config

import leantune as lt
from conftest import TwoLayer, randomize_adapter
from leantune.bench.rows import PEFT_COUNTERPART, row_settings
from leantune.bench.worker import WorkerSpec, build_model, trainable_parameters
from leantune.cli import main
from leantune.files import load_tensors
from leantune.loss import IGNORE_INDEX, causal_lm_loss, full_logits_loss
from leantune.models import load_tokenizer
from leantune.methods.prefix import ENCODER_ATTR, KEYS, VALUES, encoder_of

MODELS = ["tiny-llama", "tiny-qwen2"]
VIRTUAL = 5
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
TIGHT = {"rtol": 1e-5, "atol": 1e-5}


def prefixed(name, reparam_hidden=None, virtual=VIRTUAL, scale=0.3):
    torch.manual_seed(0)
    model = lt.attach(lt.load_model(name), lt.PrefixTuning(virtual, reparam_hidden))
    randomize_adapter(model, scale=scale)  # a reparameterisation's biases start at init values: move them too
    return model


def batch():
    """Three rows: one full, one left-padded, one right-padded (a padded prefix row must not leak)."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, -2:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return ids, mask, labels


def leaf_prefixes(encoder):
    """Copies of the adapter's trainable tensors as leaves, and the (layers, kv_heads, virtual, head_dim)
    keys and values they make, computed here in plain torch."""
    if not encoder.reparameterised:
        leaves = {"keys": encoder.keys.detach().clone(), "values": encoder.values.detach().clone()}
        leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
        return leaves, leaves["keys"], leaves["values"]
    leaves = {name: p.detach().clone().requires_grad_(True) for name, p in encoder.named_parameters()}
    hidden = torch.tanh(leaves["embedding"] @ leaves["mlp_in.weight"].T + leaves["mlp_in.bias"])
    flat = hidden @ leaves["mlp_out.weight"].T + leaves["mlp_out.bias"]  # (virtual, layers · 2 · heads · dim)
    virtual = flat.shape[0]
    per_token = flat.reshape(virtual, LAYERS, 2, KV_HEADS, HEAD_DIM)
    keys = torch.stack([per_token[:, layer, 0].transpose(0, 1) for layer in range(LAYERS)])
    values = torch.stack([per_token[:, layer, 1].transpose(0, 1) for layer in range(LAYERS)])
    return leaves, keys, values


def hand_cache(keys, values, rows):
    cache = DynamicCache()
    for layer in range(keys.shape[0]):
        cache.update(keys[layer].expand(rows, -1, -1, -1), values[layer].expand(rows, -1, -1, -1), layer)
    return cache


def reference_logits(name, keys, values, ids, mask, **kwargs):
    """The plain model with the prefixes as a cache it is handed and the mask extended by ones in front."""
    virtual = keys.shape[2]
    extended = torch.cat([torch.ones(mask.shape[0], virtual, dtype=mask.dtype), mask], dim=1)
    return lt.load_model(name)(input_ids=ids, attention_mask=extended, cache=hand_cache(keys, values, ids.shape[0]),
                               **kwargs).logits


def shifted_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def assert_grads_match(encoder, leaves):
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, leaves[name].grad, **TIGHT)


# -- forward and gradients -------------------------------------------------------------------

@pytest.mark.parametrize("reparam_hidden", [None, 8], ids=["plain", "reparam"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_and_gradients_match_a_hand_built_cache(name, reparam_hidden):
    model = prefixed(name, reparam_hidden)
    encoder = encoder_of(model)
    ids, mask, _ = batch()
    leaves, keys, values = leaf_prefixes(encoder)
    assert keys.shape == (LAYERS, KV_HEADS, VIRTUAL, HEAD_DIM)
    torch.testing.assert_close(torch.stack(encoder.prefixes()), torch.stack([keys, values]), **TIGHT)

    out = model(input_ids=ids, attention_mask=mask).logits
    expected = reference_logits(name, keys, values, ids, mask)
    torch.testing.assert_close(out, expected, **TIGHT)
    with lt.disabled(model):
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, out, atol=1e-3)

    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (expected * grad).sum().backward()
    assert_grads_match(encoder, leaves)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(ENCODER_ATTR))


@pytest.mark.parametrize("reparam_hidden", [None, 8], ids=["plain", "reparam"])
@pytest.mark.parametrize("name", MODELS)
def test_the_chunked_and_full_losses_train_the_prefixes(name, reparam_hidden):
    # both call with use_cache=False (the chunked one straight on the decoder): the attention still reads the cache
    model = prefixed(name, reparam_hidden)
    encoder = encoder_of(model)
    ids, mask, labels = batch()
    leaves, keys, values = leaf_prefixes(encoder)
    expected = shifted_loss(reference_logits(name, keys, values, ids, mask), labels)
    expected.backward()
    for loss_fn in (lambda: causal_lm_loss(model, ids, labels, mask, chunked=True, chunk_tokens=7),
                    lambda: full_logits_loss(model, ids, labels, mask)):
        model.zero_grad()
        loss = loss_fn()
        torch.testing.assert_close(loss, expected, **TIGHT)
        loss.backward()
        assert_grads_match(encoder, leaves)


@pytest.mark.parametrize("name", MODELS)
def test_positions_continue_after_the_prefix(name):
    """Without position ids the model counts from the cache's length; explicit ones (counting the real tokens,
    as generate makes them) are moved past the prefix, as PEFT does."""
    model = prefixed(name)
    ids, mask, _ = batch()
    keys, values = (t.detach() for t in encoder_of(model).prefixes())
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        explicit = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        expected = reference_logits(name, keys, values, ids, mask, position_ids=positions + VIRTUAL)
        at_zero = reference_logits(name, keys, values, ids, mask, position_ids=positions)
    torch.testing.assert_close(explicit, plain, **TIGHT)
    torch.testing.assert_close(explicit, expected, **TIGHT)
    assert not torch.allclose(explicit, at_zero, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_a_returned_cache_holds_the_prefix_and_continues_it(name):
    model = prefixed(name)
    ids, mask, _ = batch()
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, use_cache=False).cache is None  # asked for none
        first = model(input_ids=ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        assert first.cache.get_seq_length() == VIRTUAL + 7
        rest = model(input_ids=ids[:, 7:], attention_mask=mask, cache=first.cache).logits
        whole = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(rest, whole[:, 7:], **TIGHT)


def test_under_bf16_autocast_and_on_a_bf16_base_the_prefixes_follow_the_compute_dtype():
    model = prefixed("tiny-llama")
    ids, mask, _ = batch()
    keys, values = (t.detach() for t in encoder_of(model).prefixes())
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(input_ids=ids, attention_mask=mask).logits
        with lt.disabled(model):
            base = model(input_ids=ids, attention_mask=mask).logits
    assert (autocast.float() - full).abs().max() < 0.1 * (full - base).abs().max()

    half = lt.attach(lt.load_model("tiny-llama", dtype=torch.bfloat16), lt.PrefixTuning(VIRTUAL))
    encoder_of(half).load_state_dict({"keys": keys, "values": values})
    assert encoder_of(half).keys.dtype == torch.float32  # adapters train in float32 on half bases
    with torch.no_grad():
        got = half(input_ids=ids, attention_mask=mask).logits
        extended = torch.cat([torch.ones(3, VIRTUAL, dtype=mask.dtype), mask], dim=1)
        cache = hand_cache(keys.bfloat16(), values.bfloat16(), 3)
        want = lt.load_model("tiny-llama", dtype=torch.bfloat16)(input_ids=ids, attention_mask=extended,
                                                                  cache=cache).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- generation ------------------------------------------------------------------------------

def left_padded():
    ids, mask, _ = batch()
    ids, mask = ids[:2].clone(), mask[:2].clone()  # a full row and a left-padded one
    return ids.masked_fill(mask == 0, 0), mask


def greedy(model, ids, mask, steps=6, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def recomputed_greedy(model, ids, mask, steps=6):
    """Greedy decoding by calling the model on the whole sequence each step, positions as generate counts them."""
    scores = []
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        scores.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, torch.stack(scores, dim=1)


@pytest.mark.parametrize("reparam_hidden", [None, 8], ids=["plain", "reparam"])
@pytest.mark.parametrize("name", MODELS)
def test_generate_with_the_cache_equals_recomputing_and_peft_forward(name, reparam_hidden, tmp_path):
    model = prefixed(name, reparam_hidden, scale=1.0)
    ids, mask = left_padded()
    with torch.no_grad():
        cached, cached_scores = greedy(model, ids, mask)
        uncached, uncached_scores = greedy(model, ids, mask, use_cache=False)
        by_hand, by_hand_scores = recomputed_greedy(model, ids, mask)
        lt.export_peft(model, tmp_path / "peft")
        reference = peft.PeftModel.from_pretrained(lt.load_model(name), tmp_path / "peft").eval()
        by_peft, by_peft_scores = recomputed_greedy(reference, ids, mask)
    assert torch.equal(cached, uncached) and torch.equal(cached, by_hand) and torch.equal(cached, by_peft)
    for scores in (uncached_scores, by_hand_scores, by_peft_scores):
        torch.testing.assert_close(cached_scores, scores, **TIGHT)
    with torch.no_grad(), lt.disabled(model):
        base, _ = greedy(model, ids, mask)
        plain, _ = greedy(lt.load_model(name), ids, mask)
    assert torch.equal(base, plain) and not torch.equal(base, cached)


# -- lt.disabled, lt.use, copies, detach -----------------------------------------------------

def test_disabled_use_none_and_detach_give_the_exact_base(tokens):
    model = prefixed("tiny-llama")
    base = lt.load_model("tiny-llama")
    with torch.no_grad():
        expected = base(tokens).logits
        adapted = model(tokens).logits
        with lt.disabled(model):
            torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)
        lt.use(model, None)
        torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)
        lt.use(model, "default")
        torch.testing.assert_close(model(tokens).logits, adapted, rtol=0, atol=0)
        copied = copy.deepcopy(model)  # the copy's hooks read the copy's prefixes and router
        encoder_of(model).keys.zero_()
        torch.testing.assert_close(copied(tokens).logits, adapted, rtol=0, atol=0)
        lt.use(copied, None)
        assert not torch.equal(model(tokens).logits, expected)
        lt.detach(model)
        assert ENCODER_ATTR not in dict(model.named_children())
        assert not model.model._forward_pre_hooks and not model.model._forward_hooks
        torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)
    assert model.state_dict().keys() == base.state_dict().keys()


def test_stacks_with_lora_which_leaves_the_prefix_linears_alone(tokens):
    model = prefixed("tiny-llama", reparam_hidden=8)
    lt.attach(model, lt.LoRA(r=4), adapter_name="lora")
    wrapped = [name for name, module in model.named_modules() if isinstance(module, lt.methods.AdapterLayer)]
    assert len(wrapped) == 14 and not any(name.startswith(ENCODER_ATTR) for name in wrapped)
    randomize_adapter(model, seed=4)
    prefix_only = lt.attach(lt.load_model("tiny-llama"), lt.PrefixTuning(VIRTUAL))
    lt.PrefixTuning(VIRTUAL).load_state_dict(prefix_only, "default",
                                             lt.attached(model)["default"].state_dict(model, "default"))
    with torch.no_grad():
        both = model(tokens).logits
        with lt.disabled(model, "lora"):
            torch.testing.assert_close(model(tokens).logits, prefix_only(tokens).logits, rtol=0, atol=0)
        with lt.disabled(model, "default"):
            lora_only = model(tokens).logits
    assert not torch.allclose(both, lora_only, atol=1e-3)
    assert not torch.allclose(both, prefix_only(tokens).logits, atol=1e-3)


# -- saving ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_a_saved_reparameterised_adapter_holds_and_loads_the_plain_prefixes(name, tokens, tmp_path):
    model = prefixed(name, reparam_hidden=8)
    with torch.no_grad():
        keys, values = (t.clone() for t in encoder_of(model).prefixes())
        expected = model(tokens).logits
    lt.save_adapter(model, tmp_path / "adapter")
    saved = load_tensors(tmp_path / "adapter" / "adapter.safetensors")
    assert saved.keys() == {KEYS, VALUES} and saved[KEYS].shape == (LAYERS, KV_HEADS, VIRTUAL, HEAD_DIM)
    assert torch.equal(saved[KEYS], keys) and torch.equal(saved[VALUES], values)

    fresh = lt.load_adapter(lt.load_model(name), tmp_path / "adapter")
    assert lt.attached(fresh)["default"] == lt.PrefixTuning(VIRTUAL, 8)
    encoder = encoder_of(fresh)
    assert not encoder.reparameterised
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [f"{ENCODER_ATTR}.keys",
                                                                          f"{ENCODER_ATTR}.values"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens).logits, expected, rtol=0, atol=0)


def test_merged_export_and_a_second_prefix_adapter_are_refused(tmp_path):
    model = prefixed("tiny-llama")
    with pytest.raises(lt.LeantuneError, match=r"^adapter 'default' \(prefix\) cannot be merged into the base weights"):
        lt.save_merged_model(model, tmp_path / "merged", in_place=True)
    assert not (tmp_path / "merged").exists() and list(lt.attached(model)) == ["default"]
    with pytest.raises(lt.LeantuneError, match="^the model already has a prefix-tuning adapter; detach it before "
                                               "attaching another$"):
        lt.attach(model, lt.PrefixTuning(3), adapter_name="other")
    lt.use(model, None)  # a left-out prefix adapter is dropped from a merged export, not refused
    lt.save_merged_model(model, tmp_path / "merged")


# -- init from real tokens --------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_prefixes_started_from_tokens_equal_the_base_model_reading_those_tokens_first(name):
    """An independent reference: the base model run on the init tokens, then on the real ones after them."""
    base = lt.load_model(name)
    start = torch.randint(0, 512, (VIRTUAL,), generator=torch.Generator().manual_seed(4))
    model = lt.attach(copy.deepcopy(base), lt.PrefixTuning(VIRTUAL, init="vocab", seed=4))
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    expected = base(torch.cat([start.expand(2, -1), ids], dim=1)).logits[:, VIRTUAL:]
    torch.testing.assert_close(model(ids).logits, expected, **TIGHT)
    keys = encoder_of(model).keys
    assert keys.requires_grad and keys.std() < 1  # the model's own scale, not a standard normal's
    assert lt.PrefixTuning().starting_init == "vocab" and lt.PrefixTuning(reparam_hidden=8).starting_init == "random"


def test_text_init_reads_the_text_tokens_repeated_and_a_model_without_a_name_is_told_to_use_another_init():
    base = lt.load_model("tiny-llama")
    text_ids = load_tokenizer("tiny-llama")("def f")["input_ids"]
    start = torch.tensor((text_ids * VIRTUAL)[:VIRTUAL])
    model = lt.attach(copy.deepcopy(base), lt.PrefixTuning(VIRTUAL, init="text", init_text="def f"))
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(6))
    expected = base(torch.cat([start[None], ids], dim=1)).logits[:, VIRTUAL:]
    torch.testing.assert_close(model(ids).logits, expected, **TIGHT)
    base.config._name_or_path = ""
    with pytest.raises(lt.LeantuneError, match="^prefix: init='text' embeds init_text with the model's tokenizer, "
                                               "and this model has no name to load it by"):
        lt.attach(base, lt.PrefixTuning(VIRTUAL, init="text", init_text="def f"))
    assert lt.attached(base) == {} and ENCODER_ATTR not in dict(base.named_children())


@pytest.mark.parametrize("config", [
    lt.PrefixTuning(VIRTUAL, init="text", init_text="def f"),
    lt.PromptTuning(num_virtual_tokens=VIRTUAL, init="text", init_text="def f"),
    lt.Hybrid(parts=[lt.PrefixTuning(VIRTUAL), lt.LoRA(r=2, targets=["down_proj"])]),
], ids=["prefix-text", "prompt-text", "mam-vocab"])
def test_a_saved_token_started_adapter_loads_without_a_forward_pass_or_a_tokenizer(tmp_path, config):
    """The saved tensors replace the start, so loading neither runs the model nor needs its name."""
    trained = lt.attach(lt.load_model("tiny-llama"), config)
    randomize_adapter(trained, seed=3)
    lt.save_adapter(trained, tmp_path / "adapter")
    fresh = lt.load_model("tiny-llama")
    fresh.config._name_or_path = ""  # no tokenizer to find: a text start could not run
    forwards = []
    fresh.model.register_forward_hook(lambda *_: forwards.append(1))
    loaded = lt.load_adapter(fresh, tmp_path / "adapter")
    assert forwards == [] and lt.attached(loaded)["default"] == config
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, **TIGHT)


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"num_virtual_tokens": 0}, "prefix: 'num_virtual_tokens' must be an integer >= 1, got 0"),
    ({"num_virtual_tokens": 2.0}, "prefix: 'num_virtual_tokens' must be an integer >= 1, got 2.0"),
    ({"reparam_hidden": 0}, "prefix: 'reparam_hidden' must be an integer >= 1, got 0"),
    ({"reparam_hidden": True}, "prefix: 'reparam_hidden' must be an integer >= 1, got True"),
    ({"virtual_tokens": 4}, "prefix: unknown key 'virtual_tokens' (did you mean 'num_virtual_tokens'?)"),
    ({"init": "zeros"}, "prefix: 'init' must be one of 'random', 'text', 'vocab', got 'zeros'"),
    ({"init": "text"}, "prefix: init='text' needs 'init_text'"),
    ({"init_text": "def"}, "prefix: 'init_text' is only read with init='text', got init='vocab'"),
    ({"init": "vocab", "reparam_hidden": 8}, "prefix: init='vocab' starts plain prefixes, and with 'reparam_hidden'"),
])
def test_invalid_settings_are_named(fields, message):
    with pytest.raises(lt.LeantuneError) as err:
        lt.PrefixTuning.from_dict(fields)
    assert str(err.value).startswith(message)


class NoCacheDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 4)

    def forward(self, input_ids):
        return self.embed(input_ids)


class NoCacheLM(nn.Module):
    """A model whose decoder takes no cache, so no prefix could reach its attention."""

    def __init__(self):
        super().__init__()
        self.config = LlamaConfig(num_hidden_layers=1, hidden_size=4, num_attention_heads=1)
        self.body = NoCacheDecoder()

    def get_decoder(self):
        return self.body


def sliding_qwen2():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=8,
                         max_window_layers=1, layer_types=["full_attention", "sliding_attention"])
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("make, message", [
    (TwoLayer, "^prefix tuning needs a Hugging Face decoder model \\(with get_decoder\\); TwoLayer has none$"),
    (NoCacheLM, "^prefix tuning feeds its prefixes through the attention cache, and NoCacheDecoder takes no cache$"),
    (sliding_qwen2, "^prefix tuning needs full attention in every layer; this qwen2 model also has sliding_attention "
                    "layers$"),
])
def test_architectures_without_a_full_attention_cache_are_refused_at_attach(make, message):
    model = make()
    with pytest.raises(lt.LeantuneError, match=message):
        lt.attach(model, lt.PrefixTuning(4))
    assert lt.attached(model) == {} and ENCODER_ATTR not in dict(model.named_children())


def test_four_d_masks_and_gradient_checkpointed_training_are_refused(tokens):
    model = prefixed("tiny-llama")
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    with pytest.raises(lt.LeantuneError, match=r"^prefix tuning extends 2-D attention masks \(batch × tokens\) only; "
                                               r"this call passed a 4-D mask$"):
        model(tokens, attention_mask=mask)
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(lt.LeantuneError, match="^prefix tuning cannot train with gradient checkpointing: "):
        model(tokens, labels=tokens)
    with torch.no_grad():  # nothing is checkpointed without gradients
        model(tokens)


# -- the PEFT format -------------------------------------------------------------------------

@pytest.mark.parametrize("reparam_hidden", [None, 8], ids=["plain", "reparam"])
@pytest.mark.parametrize("name", MODELS)
def test_export_loads_in_peft_with_the_same_logits(name, reparam_hidden, tmp_path):
    model = prefixed(name, reparam_hidden)
    ids, mask, _ = batch()
    lt.export_peft(model, tmp_path / "peft")
    document = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: document[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers",
                                     "num_attention_heads", "num_transformer_submodules", "prefix_projection")} == {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": VIRTUAL,
        "token_dim": KV_HEADS * HEAD_DIM, "num_layers": LAYERS, "num_attention_heads": KV_HEADS,
        "num_transformer_submodules": 1, "prefix_projection": False}
    tensors = load_tensors(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prompt_embeddings": (VIRTUAL, LAYERS * 2 * 32)}
    reference = peft.PeftModel.from_pretrained(lt.load_model(name), tmp_path / "peft").eval()
    assert reference.peft_config["default"].num_attention_heads == KV_HEADS
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, **TIGHT)


def peft_prefix_model(name, projection):
    torch.manual_seed(1)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL, prefix_projection=projection,
                                     encoder_hidden_size=12 if projection else None)
    model = peft.get_peft_model(lt.load_model(name), config)
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    return model.eval()


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projected"])
@pytest.mark.parametrize("name", MODELS)
def test_import_of_a_peft_adapter_gives_peft_logits_and_exports_back_the_same_tensor(name, projection, tmp_path):
    # with prefix_projection PEFT saves the prefixes the projection makes, so both import as plain prefixes
    source = peft_prefix_model(name, projection)
    source.save_pretrained(tmp_path / "peft")
    ids, mask, _ = batch()
    model = lt.import_peft(lt.load_model(name), tmp_path / "peft")
    assert lt.attached(model)["default"] == lt.PrefixTuning(VIRTUAL)
    reloaded = peft.PeftModel.from_pretrained(lt.load_model(name), tmp_path / "peft").eval()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, source(input_ids=ids, attention_mask=mask).logits, **TIGHT)
        torch.testing.assert_close(got, reloaded(input_ids=ids, attention_mask=mask).logits, **TIGHT)
    lt.export_peft(model, tmp_path / "again")
    assert torch.equal(load_tensors(tmp_path / "again" / "adapter_model.safetensors")["prompt_embeddings"],
                       load_tensors(tmp_path / "peft" / "adapter_model.safetensors")["prompt_embeddings"])


def _edit(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"num_layers": 3}, r"PEFT num_layers=3 in '.*' does not fit this LlamaForCausalLM, whose key/value prefixes need "
                        r"num_layers=2$"),
    ({"token_dim": 64, "num_attention_heads": 4}, r"PEFT num_attention_heads=4 in .* need num_attention_heads=2$"),
    ({"num_transformer_submodules": 2}, r"PEFT num_transformer_submodules=2 in .* need num_transformer_submodules=1$"),
    ({"num_virtual_tokens": 4}, r"PEFT tensor 'prompt_embeddings' in '.*' has shape \(5, 128\), its config asks for "
                                r"\(4, 128\)$"),
    ({"modules_to_save": ["lm_head"]}, r"PEFT option modules_to_save=\['lm_head'\] in .* is not supported"),
])
def test_peft_prefix_configs_that_do_not_fit_are_named(changes, message, tmp_path):
    peft_prefix_model("tiny-llama", False).save_pretrained(tmp_path / "peft")
    _edit(tmp_path / "peft", **changes)
    model = lt.load_model("tiny-llama")
    with pytest.raises(lt.LeantuneError, match=message):
        lt.import_peft(model, tmp_path / "peft")
    assert lt.attached(model) == {}


# -- training, eval, the benchmark -----------------------------------------------------------

def write_run(folder, method=None, **keys):
    """A two-step tiny-llama run on a small JSONL file, as a YAML config file in `folder`."""
    folder.mkdir(exist_ok=True)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in zip(range(0, 48, 3), range(16, 0, -1))]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": "tiny-llama", "data": {"train": str(folder / "train.jsonl"), "eval": None},
              "max_length": 64, "batch_size": 4, "max_steps": 2, "lr": 1e-2, "warmup": 0, "save_every": 0,
              "out_dir": str(folder / "out"), "progress": False, "unit_test_table": False, "threads": 1, **keys}
    if method is not None:
        config["method"] = method
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_leantune_train_and_eval_with_method_prefix(tmp_path, capsys):
    config = write_run(tmp_path)  # no method key: the default's, replaced from the command line
    assert main(["train", str(config), "--set", "method.name=prefix", "--set", "method.num_virtual_tokens=4"]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    saved = load_tensors(tmp_path / "out" / "adapter" / "adapter.safetensors")
    model = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "out" / "adapter")
    assert lt.attached(model)["default"] == lt.PrefixTuning(4)
    assert torch.equal(encoder_of(model).keys, saved[KEYS])
    capsys.readouterr()

    assert main(["eval", "--adapter", str(tmp_path / "out" / "adapter"), "--data", str(tmp_path / "train.jsonl"),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    from leantune.data import prepare_dataset

    examples, _ = prepare_dataset(str(tmp_path / "train.jsonl"), lt.load_tokenizer("tiny-llama"), 64)
    total = count = 0
    with torch.no_grad():  # each example alone, the prefix in front
        for example in examples:
            ids = torch.tensor([example.input_ids])
            logits = model(ids).logits[0, :-1]
            targets = torch.tensor(example.labels[1:])
            total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    assert result["tokens"] == count and result["loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("reparam_hidden", [None, 8], ids=["plain", "reparam"])
def test_a_trained_adapter_reloads_to_the_same_logits_and_the_run_resumes(reparam_hidden, tmp_path, tokens):
    method = {"name": "prefix", "num_virtual_tokens": 4, "reparam_hidden": reparam_hidden}
    config = yaml.safe_load(write_run(tmp_path, method, save_every=1).read_text())
    result = lt.train(config)
    assert encoder_of(result.model).reparameterised is (reparam_hidden is not None)
    reloaded = lt.load_adapter(lt.load_model("tiny-llama"), result.adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, result.model.eval()(tokens).logits, rtol=0, atol=0)
    # reparameterised: the checkpoint keeps the MLP the optimizer trains beside the folded adapter
    resumed = lt.train({**config, "max_steps": 3}, resume=True)
    assert resumed.steps == 3 and encoder_of(resumed.model).reparameterised is (reparam_hidden is not None)


def test_trainable_parameters_equal_peft_with_and_without_the_reparameterisation():
    for hidden, projection in ((None, {}), (8, {"prefix_projection": True, "encoder_hidden_size": 8})):
        model = lt.attach(lt.load_model("tiny-llama"), lt.PrefixTuning(20, hidden))
        reference = peft.get_peft_model(lt.load_model("tiny-llama"),
                                        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                                **projection))
        ours = lt.summary(model)["trainable"]
        assert ours == sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert lt.summary(lt.attach(lt.load_model("tiny-llama"), lt.PrefixTuning()))["trainable"] == 2 * 2 * 2 * 20 * 16


def test_bench_rows_build_the_same_prefix_in_leantune_and_peft():
    assert row_settings("prefix") == {"name": "prefix", "num_virtual_tokens": 20}
    assert PEFT_COUNTERPART["prefix"] == "peft-prefix"
    counts = {}
    for row, kind in (("prefix", "leantune"), ("peft-prefix", "peft")):
        spec = WorkerSpec(row=row, kind=kind, settings=row_settings(row), model="tiny-llama", batch=1, seq=8,
                          steps=1, warmup=0)
        counts[row] = sum(p.numel() for p in trainable_parameters(build_model(spec)))
    assert counts == {"prefix": 2560, "peft-prefix": 2560}
    # the chunked loss would call the decoder past PeftModel.forward, which adds PEFT's prefix
    spec = WorkerSpec(row="peft-prefix", kind="peft", settings=row_settings("peft-prefix"), model="tiny-llama",
                      batch=1, seq=8, steps=1, warmup=0, loss="chunked")
    with pytest.raises(ValueError, match="^PEFT prompt learning puts its virtual tokens or prefixes in outside the "
                                         "decoder that the chunked loss calls"):
        build_model(spec)
