"""Prompt tuning against plain transformers (the model on cat(P, embed(ids))) and against PEFT.

The reference for every forward is the untouched model called with `inputs_embeds = cat(P, E[ids])`,
the mask extended by ones for the virtual tokens, and its logits at the real positions.
"""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml

import leantune as lt
from helpers import IGNORE, byte_ids, sharp_model
from leantune.cli import main
from leantune.data.formats import Example
from leantune.errors import LeantuneError
from leantune.eval.generation import generate
from leantune.eval.metrics import loss_and_perplexity
from leantune.files import load_tensors
from leantune.loss import causal_lm_loss
from leantune.methods import config_from_dict

peft = pytest.importorskip("peft")

V = 5  # virtual tokens in most tests
ATOL = {"rtol": 0, "atol": 1e-5}


def prompt_of(model, name="default") -> torch.nn.Parameter:
    return lt.attached(model)[name].state_dict(model, name)["prompt_embeddings"]


def prompted(model, count=V, scale=0.3, seed=1, **fields):
    """`model` with a prompt adapter whose virtual tokens are random, well away from the init."""
    lt.attach(model, lt.PromptTuning(num_virtual_tokens=count, **fields))
    with torch.no_grad():
        prompt = prompt_of(model)
        prompt.copy_(torch.randn(prompt.shape, generator=torch.Generator().manual_seed(seed)) * scale)
    return model


def padded_batch():
    """Three rows: unpadded, right-padded (3 pads), left-padded (4 pads); labels -100 on pads and on a prompt."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, :4] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[0, :3] = IGNORE
    return ids, mask, labels


def reference_logits(base, prompt, ids, mask=None, positions=None):
    """The plain model on cat(P, E[ids]), with ones for P in the mask and positions 0..V-1 before the given
    ones moved up by V (none given and a row left-padded: every row counted from its first real token,
    so no padding sits between P and the text); the logits at the real positions."""
    count, batch = prompt.shape[0], ids.shape[0]
    leading_pads = None if mask is None else (mask.cumsum(-1) == 0).sum(-1)
    if positions is None and leading_pads is not None and bool(leading_pads.any()):
        positions = (torch.arange(ids.shape[1])[None] - leading_pads[:, None]).clamp(min=0)
    embeds = torch.cat([prompt.expand(batch, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    if mask is not None:
        mask = torch.cat([torch.ones(batch, count, dtype=mask.dtype), mask], dim=1)
    if positions is not None:
        positions = torch.cat([torch.arange(count).expand(batch, -1), positions + count], dim=1)
    return base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, count:]


def hand_loss(logits, labels):
    """Mean next-token cross-entropy over the labelled real tokens (the first one is never predicted)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


def reference_greedy(base, prompt, ids, steps):
    """Greedy decoding by hand: the full reference forward at every step, no cache."""
    with torch.no_grad():
        for _ in range(steps):
            token = reference_logits(base, prompt, ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
    return ids


def peft_prompt_model(base, prompt):
    """PEFT's prompt tuning on `base` with the given virtual tokens."""
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                               num_virtual_tokens=prompt.shape[0]))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(prompt)
    return model.eval()


# -- the config ----------------------------------------------------------------------------

def test_defaults_and_the_registered_name():
    config = config_from_dict({"name": "prompt"})
    assert config == lt.PromptTuning() and config.to_dict() == {
        "name": "prompt", "num_virtual_tokens": 20, "init": "random", "init_text": None, "seed": 0}
    assert lt.PromptTuning.mergeable is False


@pytest.mark.parametrize("fields, culprit", [
    ({"num_virtual_tokens": 0}, r"'num_virtual_tokens' must be an integer >= 1"),
    ({"num_virtual_tokens": 2.5}, r"'num_virtual_tokens' must be an integer"),
    ({"init": "normal"}, r"'init' must be one of 'random', 'text', 'vocab', got 'normal'"),
    ({"init": "text"}, r"init='text' needs 'init_text'"),
    ({"init": "text", "init_text": ""}, r"init='text' needs 'init_text'"),
    ({"init_text": "hello"}, r"'init_text' is only read with init='text', got init='random'"),
    ({"seed": -1}, r"'seed' must be an integer >= 0"),
])
def test_bad_config_values_name_the_key(fields, culprit):
    with pytest.raises(LeantuneError, match=rf"^prompt: {culprit}"):
        lt.PromptTuning(**fields)


def test_a_model_without_a_decoder_body_is_refused(plain_module):
    with pytest.raises(LeantuneError, match=r"prompt tuning needs a Hugging Face causal LM .*TwoLayer has none$"):
        lt.attach(plain_module, lt.PromptTuning())
    assert lt.attached(plain_module) == {}


# -- forward, gradients and every loss -----------------------------------------------------

def test_forward_and_gradients_match_the_plain_model_on_prepended_embeddings():
    model, base = prompted(lt.load_model("tiny-llama")), lt.load_model("tiny-llama")
    ids, mask, labels = padded_batch()
    prompt = prompt_of(model)
    reference_prompt = prompt.detach().clone().requires_grad_(True)

    out = model(ids, attention_mask=mask, labels=labels)
    expected = reference_logits(base, reference_prompt, ids, mask)
    assert out.logits.shape == (3, 10, 512)
    torch.testing.assert_close(out.logits, expected, **ATOL)
    expected_loss = hand_loss(expected, labels)
    torch.testing.assert_close(out.loss.double(), expected_loss, rtol=1e-6, atol=0)

    out.loss.backward()
    expected_loss.backward()
    assert prompt.grad.abs().sum() > 0
    torch.testing.assert_close(prompt.grad, reference_prompt.grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("leantune_prompts."))


def test_given_position_ids_move_up_behind_the_virtual_tokens():
    model, base = prompted(lt.load_model("tiny-llama")), lt.load_model("tiny-llama")
    ids, mask, _ = padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate derives from a left-padded mask
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(got, reference_logits(base, prompt_of(model), ids, mask, positions), **ATOL)
        # positions 0..T-1 are what the model counts without them
        torch.testing.assert_close(model(ids, position_ids=torch.arange(10).expand(3, -1)).logits,
                                   model(ids).logits, **ATOL)


def test_a_left_padded_row_without_position_ids_equals_the_row_alone():
    """Pads must not sit between the virtual tokens and the text: a forward given only a padded mask
    counts each row's positions over its real tokens, with one adapter selected and with rows routed."""
    model = prompted(lt.load_model("tiny-llama"))
    lt.attach(model, lt.LoRA(r=4), adapter_name="lora")
    lt.use(model, "default")
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        alone = model(ids[2:, 4:]).logits[0]  # row 2 without its 4 pads
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[2, 4:], alone, **ATOL)
        lt.use(model, None)
        routed = model(ids, attention_mask=mask, adapter_names=["lora", None, "default"]).logits
        torch.testing.assert_close(routed[2, 4:], alone, **ATOL)


def test_chunked_loss_equals_full_logits_loss_equals_the_hand_computed_one():
    model, base = prompted(lt.load_model("tiny-llama")), lt.load_model("tiny-llama")
    ids, mask, labels = padded_batch()
    expected = hand_loss(reference_logits(base, prompt_of(model).detach(), ids, mask), labels)
    grads = []
    for chunked in (True, False):
        loss = causal_lm_loss(model, ids, labels, mask, chunked=chunked, chunk_tokens=7)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
        loss.backward()
        grads.append(prompt_of(model).grad.clone())
        model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    # the top-level labels= loss scores the same tokens
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=labels).loss.double(), expected, rtol=1e-6, atol=0)


def test_eval_loss_and_perplexity_cover_the_real_tokens(tmp_path, capsys):
    model, base = prompted(lt.load_model("tiny-llama")), lt.load_model("tiny-llama")
    generator = torch.Generator().manual_seed(3)
    examples = []
    for length in (7, 12, 9, 15):
        ids = torch.randint(0, 256, (length,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE] * 2 + ids[2:]))
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = reference_logits(base, prompt_of(model), torch.tensor([example.input_ids]))
            targets = torch.tensor([example.labels])
            total += float(hand_loss(logits, targets)) * int((targets[:, 1:] != IGNORE).sum())
            count += int((targets[:, 1:] != IGNORE).sum())
    result = loss_and_perplexity(model, examples, pad_id=257, batch_size=3)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)

    # `leantune eval` on the saved adapter
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "x = ", "completion": "42 + y"}) + "\n")
    lt.save_adapter(model, tmp_path / "adapter")
    assert main(["eval", "--adapter", str(tmp_path / "adapter"), "--data", str(pairs), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    ids = byte_ids("x = 42 + y") + [256]
    labels = torch.tensor([[IGNORE] * 4 + ids[4:]])
    with torch.no_grad():
        expected = float(hand_loss(reference_logits(base, prompt_of(model), torch.tensor([ids])), labels))
    assert reported["loss"] == pytest.approx(expected, rel=1e-5)


# -- disabled, lt.use, stacking ------------------------------------------------------------

def test_disabled_and_use_none_run_the_exact_base_and_use_picks_adapters():
    model, base = lt.load_model("tiny-llama"), lt.load_model("tiny-llama")
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        original = base(ids, attention_mask=mask).logits
        lt.attach(model, lt.PromptTuning(num_virtual_tokens=2, seed=1), "a")
        lt.attach(model, lt.PromptTuning(num_virtual_tokens=3, init="vocab", seed=2), "b")
        first, second = prompt_of(model, "a"), prompt_of(model, "b")
        with lt.disabled(model):
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, original, rtol=0, atol=0)
        # stacked in attach order: the later adapter's tokens go in front of the earlier one's
        torch.testing.assert_close(model(ids, attention_mask=mask).logits,
                                   reference_logits(base, torch.cat([second, first]), ids, mask), **ATOL)
        lt.use(model, "a")
        torch.testing.assert_close(model(ids, attention_mask=mask).logits,
                                   reference_logits(base, first, ids, mask), **ATOL)
        lt.use(model, None)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, original, rtol=0, atol=0)
        lt.use(model, ["a", "b"])
        lt.detach(model)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, original, rtol=0, atol=0)
    assert not hasattr(model, "leantune_prompts") and not model.model._forward_pre_hooks


# -- generation with and without the KV cache ----------------------------------------------

def test_greedy_generation_with_cache_equals_without_and_the_reference_and_peft():
    model, base = prompted(sharp_model()), sharp_model()
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(4))
    expected = reference_greedy(base, prompt_of(model).detach(), ids, 10)
    options = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, **options)
        uncached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **options)
        with lt.disabled(model):
            plain = model.generate(ids, use_cache=True, **options)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)
    assert not torch.equal(plain, expected)
    # PEFT 0.21's cached generate looks for `past_key_values`, which transformers 5 renamed `cache`, and
    # re-inserts its tokens at every step; its uncached one is the reference.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_prompt_model(sharp_model(), prompt_of(model).detach()).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **options)
    assert torch.equal(theirs, expected)


def test_batched_left_padded_generation_equals_each_prompt_alone():
    model, base = prompted(sharp_model()), sharp_model()
    tokenizer = lt.load_tokenizer("tiny-llama")
    prompts = ["def f(x):\n    return x", "hi", "a longer prompt with several more words in it"]
    expected = []
    for text in prompts:
        ids = torch.tensor([tokenizer(text).input_ids])
        new = reference_greedy(base, prompt_of(model).detach(), ids, 8)[0, ids.shape[1]:].tolist()
        end = next((i for i, t in enumerate(new) if t == tokenizer.eos_token_id), len(new))
        expected.append(tokenizer.decode(new[:end], skip_special_tokens=True))
    assert generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3) == expected


def test_cached_steps_extend_the_mask_and_a_cache_without_the_tokens_is_refused():
    model = prompted(sharp_model())
    ids, mask, _ = padded_batch()
    step = torch.randint(0, 512, (3, 1), generator=torch.Generator().manual_seed(5))
    longer = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).cache
        got = model(step, attention_mask=longer, cache=cache).logits[:, -1]
        full = model(torch.cat([ids, step], dim=1), attention_mask=longer).logits[:, -1]
        torch.testing.assert_close(got, full, **ATOL)
        with lt.disabled(model):
            plain_cache = model(ids, attention_mask=mask, use_cache=True).cache
        with pytest.raises(LeantuneError, match=r"^prompt adapter 'default': the KV cache given to this forward was "
                                                r"filled without its virtual tokens"):
            model(step, attention_mask=longer, cache=plain_cache)
        with pytest.raises(LeantuneError, match=r"^prompt adapter 'default' extends 2-D attention masks"):
            model(ids, attention_mask=mask[:, None, None, :].bool())


# -- the initial virtual tokens ------------------------------------------------------------

def test_random_init_is_seeded_at_the_embeddings_scale():
    embeddings = lt.load_model("tiny-llama").get_input_embeddings().weight
    first, again, other = (prompt_of(lt.attach(lt.load_model("tiny-llama"), lt.PromptTuning(seed=s))) for s in (3, 3, 4))
    assert first.shape == (20, 64) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.std()) == pytest.approx(float(embeddings.std()), rel=0.15)


def test_vocab_init_copies_seeded_vocabulary_rows():
    embeddings = lt.load_model("tiny-llama").get_input_embeddings().weight
    prompt = prompt_of(lt.attach(lt.load_model("tiny-llama"), lt.PromptTuning(num_virtual_tokens=8, init="vocab", seed=7)))
    rows = torch.randint(0, 512, (8,), generator=torch.Generator().manual_seed(7))
    assert torch.equal(prompt, embeddings[rows])


@pytest.mark.parametrize("count", [3, 12])
def test_text_init_embeds_the_text_repeated_or_cut(count):
    embeddings = lt.load_model("tiny-llama").get_input_embeddings().weight
    config = lt.PromptTuning(num_virtual_tokens=count, init="text", init_text="def f")
    prompt = prompt_of(lt.attach(lt.load_model("tiny-llama"), config))
    ids = (byte_ids("def f") * 3)[:count]
    assert torch.equal(prompt, embeddings[ids])


def test_text_init_without_a_tokenizer_says_why():
    config = lt.PromptTuning(init="text", init_text="hello")
    model = lt.load_model("tiny-llama")
    model.config._name_or_path = ""
    with pytest.raises(LeantuneError, match=r"^prompt: init='text' embeds init_text with the model's tokenizer, and "
                                            r"this model has no name to load it by"):
        lt.attach(model, config)
    model.config._name_or_path = "/no/such/model"
    with pytest.raises(LeantuneError, match=r"^prompt: init='text' needs the tokenizer of '/no/such/model' to embed "
                                            r"init_text \(unknown model '/no/such/model'"):
        lt.attach(model, config)
    assert lt.attached(model) == {} and not hasattr(model, "leantune_prompts")


def test_trainable_parameters_on_smollm2_at_the_defaults():
    model = lt.attach(lt.load_model("smollm2-135m"), lt.PromptTuning())
    assert lt.summary(model)["trainable"] == 20 * 576


# -- PEFT format, both ways ----------------------------------------------------------------

def test_export_writes_what_peft_writes_and_peft_loads_it(tmp_path):
    model = prompted(lt.load_model("tiny-llama"))
    ids, mask, _ = padded_batch()
    lt.export_peft(model, tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())

    theirs_model = peft.get_peft_model(lt.load_model("tiny-llama"),
                                       peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V))
    theirs_model.save_pretrained(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs) - {"peft_version"}
    assert {k: v for k, v in ours.items() if k != "base_model_name_or_path"} == \
           {k: v for k, v in theirs.items() if k not in ("peft_version", "base_model_name_or_path")}
    assert ours["base_model_name_or_path"] == "tiny-llama"

    tensors = load_tensors(tmp_path / "ours" / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"] and torch.equal(tensors["prompt_embeddings"], prompt_of(model))
    loaded = peft.PeftModel.from_pretrained(lt.load_model("tiny-llama"), tmp_path / "ours").eval()
    with torch.no_grad():
        theirs_logits = loaded(input_ids=ids, attention_mask=mask).logits
        assert theirs_logits.shape == (3, V + 10, 512)
        # rows 0-1 (unpadded, right-padded); PEFT's forward counts positions through row 2's left
        # padding, so its logits there depend on the padding (its generate passes positions: equal)
        torch.testing.assert_close(theirs_logits[:2, V:], model(ids, attention_mask=mask).logits[:2], **ATOL)


def test_peft_loss_scores_one_token_more_the_first_real_one():
    """Documented difference: PEFT's labels= loss also predicts labels[:, 0] from the last virtual position."""
    model = prompted(lt.load_model("tiny-llama"))
    ids, mask, labels = padded_batch()
    theirs = peft_prompt_model(lt.load_model("tiny-llama"), prompt_of(model).detach())
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=mask, labels=labels)
        ours = model(ids, attention_mask=mask, labels=labels).loss.double()
    first = labels[:, 0] != IGNORE
    extra = F.cross_entropy(out.logits[first, V - 1].double(), labels[first, 0], reduction="sum")
    ours_count = int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(out.loss.double(), (ours * ours_count + extra) / (ours_count + int(first.sum())),
                               rtol=1e-5, atol=0)


def test_export_of_a_text_init_names_peft_a_tokenizer(tmp_path):
    model = lt.attach(lt.load_model("tiny-llama"), lt.PromptTuning(num_virtual_tokens=4, init="text", init_text="hi"))
    lt.export_peft(model, tmp_path / "text")
    document = json.loads((tmp_path / "text" / "adapter_config.json").read_text())
    assert (document["prompt_tuning_init"], document["prompt_tuning_init_text"],
            document["tokenizer_name_or_path"]) == ("TEXT", "hi", "tiny-llama")
    loaded = peft.PeftModel.from_pretrained(lt.load_model("tiny-llama"), tmp_path / "text")
    assert loaded.peft_config["default"].prompt_tuning_init == "TEXT"
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight, prompt_of(model))
    reimported = lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "text")
    assert lt.attached(reimported)["default"] == lt.attached(model)["default"]


@pytest.mark.parametrize("peft_init, init", [("RANDOM", "random"), ("SAMPLE_VOCAB", "vocab")])
def test_import_matches_peft_logits(tmp_path, peft_init, init):
    theirs = peft.get_peft_model(lt.load_model("tiny-llama"), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init=peft_init))
    with torch.no_grad():
        weight = theirs.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    model = lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    assert lt.attached(model)["default"] == lt.PromptTuning(num_virtual_tokens=4, init=init)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[:2],  # rows without left padding
                                   theirs.eval()(input_ids=ids, attention_mask=mask).logits[:2, 4:], **ATOL)
    lt.export_peft(model, tmp_path / "again")  # and back: the same tensor
    assert torch.equal(load_tensors(tmp_path / "again" / "adapter_model.safetensors")["prompt_embeddings"],
                       load_tensors(tmp_path / "peft" / "adapter_model.safetensors")["prompt_embeddings"])


def _edited_peft_adapter(tmp_path, **changes):
    theirs = peft.get_peft_model(lt.load_model("tiny-llama"),
                                 peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    theirs.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return tmp_path / "peft"


def test_import_of_a_text_init_keeps_the_text(tmp_path):
    folder = _edited_peft_adapter(tmp_path, prompt_tuning_init="TEXT", prompt_tuning_init_text="def f",
                                  tokenizer_name_or_path="someone/tokenizer")
    model = lt.import_peft(lt.load_model("tiny-llama"), folder)
    assert lt.attached(model)["default"] == lt.PromptTuning(num_virtual_tokens=4, init="text", init_text="def f")
    assert torch.equal(prompt_of(model), load_tensors(folder / "adapter_model.safetensors")["prompt_embeddings"])


@pytest.mark.parametrize("changes, message", [
    ({"task_type": "SEQ_2_SEQ_LM"}, r"has task_type='SEQ_2_SEQ_LM'; import_peft reads prompt tuning for causal LMs"),
    ({"num_transformer_submodules": 2}, r"has num_transformer_submodules=2; a causal LM's prompt goes in front of one"),
    ({"prompt_tuning_init": "MAGIC"}, r"has prompt_tuning_init='MAGIC', which import_peft does not know"),
    ({"modules_to_save": ["lm_head"]}, r"PEFT option modules_to_save=\['lm_head'\] .* is not supported"),
    ({"num_virtual_tokens": 6}, r"adapter tensor 'prompt_embeddings' has shape \(4, 64\), the model expects \(6, 64\)"),
])
def test_import_refuses_what_it_cannot_match(tmp_path, changes, message):
    folder = _edited_peft_adapter(tmp_path, **changes)
    model = lt.load_model("tiny-llama")
    with pytest.raises(LeantuneError, match=message):
        lt.import_peft(model, folder)
    assert lt.attached(model) == {} and not hasattr(model, "leantune_prompts")


def test_import_refuses_a_file_with_other_tensors(tmp_path):
    from safetensors.torch import save_file

    folder = _edited_peft_adapter(tmp_path)
    save_file({"prompt_embeddings": torch.zeros(4, 64), "extra": torch.zeros(1)}, folder / "adapter_model.safetensors")
    with pytest.raises(LeantuneError, match=r"holds tensor 'extra'; a PEFT prompt-tuning adapter holds exactly one"):
        lt.import_peft(lt.load_model("tiny-llama"), folder)


# -- training from the command line --------------------------------------------------------

def test_train_cli_with_method_name_prompt(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(16)))
    config = {"model": "tiny-llama", "method": {"name": "lora", "r": 4}, "data": {"train": str(data), "eval": None},
              "max_length": 32, "batch_size": 4, "max_steps": 2, "lr": 1e-2, "warmup": 0, "save_every": 0,
              "out_dir": str(tmp_path / "out"), "progress": False, "unit_test_table": False, "threads": 1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "config.yaml"), "--set", "method.name=prompt",
                 "--set", "method.num_virtual_tokens=4"]) == 0
    out = tmp_path / "out"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)

    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())["method"]
    assert saved == {"name": "prompt", "num_virtual_tokens": 4, "init": "random", "init_text": None, "seed": 0}
    prompt = load_tensors(out / "adapter" / "adapter.safetensors")["prompt_embeddings"]
    start = prompt_of(lt.attach(lt.load_model("tiny-llama"), lt.PromptTuning(num_virtual_tokens=4)))
    assert prompt.shape == (4, 64) and not torch.equal(prompt, start)  # trained
    ids, mask, _ = padded_batch()
    reloaded = lt.load_adapter(lt.load_model("tiny-llama"), out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits,
                                   reference_logits(lt.load_model("tiny-llama"), prompt, ids, mask), **ATOL)


# -- the benchmark rows --------------------------------------------------------------------

def test_bench_rows_prompt_and_peft_prompt_score_the_same_tokens():
    from leantune.bench.rows import PEFT_COUNTERPART, row_settings
    from leantune.bench.worker import WorkerSpec, build_model, trainable_parameters

    def spec(row, kind, loss="full"):
        return WorkerSpec(row=row, kind=kind, settings=row_settings(row), model="tiny-llama", batch=2, seq=16,
                          steps=1, warmup=0, loss=loss)

    assert PEFT_COUNTERPART["prompt"] == "peft-prompt"
    ours, theirs = build_model(spec("prompt", "leantune")), build_model(spec("peft-prompt", "peft"))
    assert [p.numel() for p in trainable_parameters(ours)] == [p.numel() for p in trainable_parameters(theirs)] == [20 * 64]
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(prompt_of(ours))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(causal_lm_loss(theirs, ids, ids, chunked=False), causal_lm_loss(ours, ids, ids, chunked=False),
                               rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"measure this row with --chunked-loss off$"):
        build_model(spec("peft-prompt", "peft", loss="chunked"))
