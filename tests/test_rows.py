"""One adapter per batch row (`adapter_names=`): each row equals that row run alone with its adapter."""
from __future__ import annotations

import pytest
import torch

import leantune as lt
from conftest import randomize_adapter
from leantune import api
from leantune.errors import LeantuneError

TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture
def mixed(tiny_llama):
    torch.manual_seed(0)  # LoRA's A starts from the global generator: the same adapters in any test order
    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8), adapter_name="lora")
    lt.attach(tiny_llama, lt.DoRA(r=2, alpha=4), adapter_name="dora")
    lt.attach(tiny_llama, lt.IA3(), adapter_name="ia3")
    lt.attach(tiny_llama, lt.PaCA(r=4, alpha=8), adapter_name="paca")
    lt.attach(tiny_llama, lt.LoRA(r=8, alpha=4, rslora=True, targets=["q_proj", "v_proj"]), adapter_name="rs")
    randomize_adapter(tiny_llama)
    return tiny_llama.eval()


def alone(model, name, tokens, **kwargs):
    lt.use(model, None if name == "__base__" else name)
    try:
        return model(tokens, **kwargs).logits
    finally:
        lt.use(model, None)


def assert_rows_generate_as_alone(model, tokens, names, new_tokens):
    """Greedy generation with one adapter per row gives each row what it gives alone with its adapter."""
    options = dict(max_new_tokens=new_tokens, do_sample=False)
    together = model.generate(tokens, attention_mask=torch.ones_like(tokens), adapter_names=names, **options)
    for i, name in enumerate(names):
        lt.use(model, name)
        single = model.generate(tokens[i:i + 1], attention_mask=torch.ones_like(tokens[i:i + 1]), **options)
        assert together[i].tolist() == single[0].tolist(), name
    lt.use(model, None)


ROWS = ["lora", None, "dora", "ia3", "paca", "rs", "__base__", "lora"]


def test_each_row_equals_its_adapter_alone(mixed):
    tokens = torch.randint(0, 256, (len(ROWS), 10), generator=torch.Generator().manual_seed(1))
    expected = torch.cat([alone(mixed, name, tokens[i:i + 1]) for i, name in enumerate(ROWS)])
    lt.use(mixed, None)
    got = mixed(tokens, adapter_names=ROWS).logits
    torch.testing.assert_close(got, expected, **TOL)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the adapters do change the rows
    torch.testing.assert_close(mixed(tokens).logits, alone(mixed, None, tokens), **TOL)  # routing ends with the call


@pytest.mark.parametrize("duplicate", ["deepcopy", "pickle"])
def test_a_copy_of_the_model_routes_its_own_rows(mixed, duplicate):
    """A deepcopy (a reference model, EMA) or a pickled model gets per-row routing of its own."""
    import copy, io  # noqa: E401  (only this test copies models)

    tokens = torch.randint(0, 256, (len(ROWS), 10), generator=torch.Generator().manual_seed(1))
    expected = torch.cat([alone(mixed, name, tokens[i:i + 1]) for i, name in enumerate(ROWS)])
    if duplicate == "deepcopy":
        twin = copy.deepcopy(mixed)
    else:
        buffer = io.BytesIO()
        torch.save(mixed, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    lt.detach(mixed)  # the original changing does not reach the copy
    torch.testing.assert_close(twin(tokens, adapter_names=ROWS).logits, expected, **TOL)


def test_greedy_generation_per_row_equals_each_adapter_alone(mixed):
    tokens = torch.randint(0, 256, (4, 7), generator=torch.Generator().manual_seed(2))
    lt.use(mixed, None)
    assert_rows_generate_as_alone(mixed, tokens, ["paca", "dora", None, "ia3"], 6)


@pytest.mark.parametrize("names", [
    ["rs", "lora", "lora", "lora", "lora", "lora", None],  # one adapter on most rows: split into groups
    ["paca", "paca", "dora", "paca"],  # a subset of the attached adapters, out of stack order
    [None, "__base__", None],  # no row runs an adapter
    ["ia3", "rs", "ia3"],  # an adapter without factors beside one with them
    ["dora", "rs", "lora", "paca"],  # every row its own adapter: the groups are the rows, in order
    ["rs", "rs", "rs"],  # one adapter for all rows
    ["dora", "dora", "ia3", "paca"],  # consecutive entries of the stack, not from its first: a view of it
])
def test_rows_grouped_unevenly_still_equal_each_adapter_alone(mixed, names):
    tokens = torch.randint(0, 256, (len(names), 6), generator=torch.Generator().manual_seed(len(names)))
    expected = torch.cat([alone(mixed, name, tokens[i:i + 1]) for i, name in enumerate(names)])
    torch.testing.assert_close(mixed(tokens, adapter_names=names).logits, expected, **TOL)


def test_rows_naming_an_adapter_switched_off_by_disabled_are_refused(mixed):
    tokens = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(9))
    expected = torch.cat([alone(mixed, "rs", tokens[:1]), alone(mixed, None, tokens[1:])])
    lt.use(mixed, ["lora", "rs", "paca"])
    with lt.disabled(mixed, "lora"):
        with pytest.raises(LeantuneError, match="'lora', which the enclosing lt.disabled block switches off"):
            mixed(tokens, adapter_names=["lora", None])
        torch.testing.assert_close(mixed(tokens, adapter_names=["rs", None]).logits, expected, **TOL)  # others route
    with lt.disabled(mixed):
        with pytest.raises(LeantuneError, match="switches off"):
            mixed.generate(tokens, adapter_names=["rs", "paca"], max_new_tokens=2, do_sample=False)


def test_generate_reads_the_adapters_once_so_a_data_write_between_calls_is_seen(mixed):
    tokens = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(8))
    names = ["lora", "rs"]
    mixed.generate(tokens, attention_mask=torch.ones_like(tokens), adapter_names=names, max_new_tokens=4,
                   do_sample=False)
    assert api.router(mixed).trust_versions is False  # the skip lasts one generate call
    for layer in (m for m in mixed.modules() if hasattr(m, "lora_B")):
        layer.lora_B.data.mul_(-4)
    assert_rows_generate_as_alone(mixed, tokens, names, 4)


def test_under_trusted_versions_attach_detach_load_and_merge_still_reach_the_next_routed_forward(mixed, tmp_path):
    """The server trusts that adapters change only by attach, detach or load: those (and merge) are seen."""
    api.router(mixed).trust_versions = True
    tokens = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(12))
    names = ["rs", "lora", None]
    mixed(tokens, adapter_names=names)  # the stacked forms are cached now
    lt.save_adapter(mixed, tmp_path / "rs", adapter_name="rs")
    lt.detach(mixed, "rs")
    lt.attach(mixed, lt.LoRA(r=8, alpha=4, rslora=True, targets=["q_proj", "v_proj"]), adapter_name="rs")
    randomize_adapter(mixed, seed=13)  # a new "rs" (and every other adapter moved: no stale form may survive)
    lt.use(mixed, None)
    api.router(mixed).layout += 1  # randomize_adapter wrote tensors in place, outside the trusted paths
    expected = torch.cat([alone(mixed, name, tokens[i:i + 1]) for i, name in enumerate(names)])
    torch.testing.assert_close(mixed(tokens, adapter_names=names).logits, expected, **TOL)
    lt.detach(mixed, "rs")
    lt.load_adapter(mixed, tmp_path / "rs", adapter_name="rs")  # the saved one back
    expected = torch.cat([alone(mixed, name, tokens[i:i + 1]) for i, name in enumerate(names)])
    torch.testing.assert_close(mixed(tokens, adapter_names=names).logits, expected, **TOL)
    lt.use(mixed, "lora")
    lt.merge(mixed, "lora")
    with pytest.raises(LeantuneError, match="merged"):
        mixed(tokens, adapter_names=names)


def test_under_trusted_versions_paca_columns_placed_by_a_plain_forward_and_a_paca_merge_are_seen(tiny_llama):
    """PaCA innermost: a plain forward leaves its columns in the base weight; a trusted routed
    forward still takes them out, and merging PaCA (its own merge, not AdapterLayer's) is refused."""
    lt.attach(tiny_llama, lt.PaCA(r=4, alpha=8), adapter_name="paca")
    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8), adapter_name="lora")
    randomize_adapter(tiny_llama)
    model = tiny_llama.eval()
    tokens = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(3))
    names = ["paca", "lora", None]
    expected = torch.cat([alone(model, name, tokens[i:i + 1]) for i, name in enumerate(names)])
    api.router(model).trust_versions = True
    model(tokens, adapter_names=names)
    alone(model, "paca", tokens)  # a plain forward: PaCA's columns go into the base weight
    torch.testing.assert_close(model(tokens, adapter_names=names).logits, expected, **TOL)
    lt.use(model, "paca")
    lt.merge(model, "paca")
    with pytest.raises(LeantuneError, match="merged"):
        model(tokens, adapter_names=names)


@pytest.fixture
def prompts(tiny_llama):
    lt.attach(tiny_llama, lt.PromptTuning(num_virtual_tokens=3), adapter_name="p3")
    lt.attach(tiny_llama, lt.PromptTuning(num_virtual_tokens=5, init="vocab", seed=1), adapter_name="p5")
    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8), adapter_name="lora")
    randomize_adapter(tiny_llama, seed=9)
    return tiny_llama.eval()


PROMPT_ROWS = ["p5", "lora", None, "p3", "p5"]


def test_prompt_tuning_rows_each_equal_their_adapter_alone_with_and_without_padding(prompts):
    tokens = torch.randint(0, 256, (len(PROMPT_ROWS), 6), generator=torch.Generator().manual_seed(10))
    expected = torch.cat([alone(prompts, name, tokens[i:i + 1]) for i, name in enumerate(PROMPT_ROWS)])
    torch.testing.assert_close(prompts(tokens, adapter_names=PROMPT_ROWS).logits, expected, **TOL)
    mask = torch.ones_like(tokens)
    mask[1, :2] = mask[3, :1] = 0  # left padding of the real tokens, positions counted from the mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = prompts(tokens, attention_mask=mask, position_ids=positions, adapter_names=PROMPT_ROWS).logits
    for i, name in enumerate(PROMPT_ROWS):
        real = mask[i].bool()
        torch.testing.assert_close(got[i, real], alone(prompts, name, tokens[i:i + 1, real])[0], **TOL)


def test_prompt_tuning_rows_generate_greedily_as_each_adapter_alone(prompts):
    tokens = torch.randint(0, 256, (len(PROMPT_ROWS), 5), generator=torch.Generator().manual_seed(11))
    assert_rows_generate_as_alone(prompts, tokens, PROMPT_ROWS, 5)


def test_a_cache_filled_for_other_prompt_rows_is_refused(prompts):
    from transformers import DynamicCache

    tokens = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(12))
    cache = DynamicCache()
    prompts(tokens, use_cache=True, past_key_values=cache, adapter_names=["p3", "p5"])
    with pytest.raises(LeantuneError, match="was not filled with these rows' prompt adapters"):
        prompts(tokens[:, :1], use_cache=True, past_key_values=cache, adapter_names=["p5", "p3"])


def test_pissa_rows_use_the_original_weight_for_the_base(tiny_llama):
    lt.attach(tiny_llama, lt.LoRA(r=2, alpha=4, init="pissa"), adapter_name="pissa")
    lt.attach(tiny_llama, lt.LoRA(r=3, alpha=3), adapter_name="plain")
    randomize_adapter(tiny_llama, seed=3)
    tiny_llama.eval()
    tokens = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(3))
    names = ["pissa", None, "plain"]
    expected = torch.cat([alone(tiny_llama, name, tokens[i:i + 1]) for i, name in enumerate(names)])
    torch.testing.assert_close(tiny_llama(tokens, adapter_names=names).logits, expected, **TOL)


def test_a_data_write_and_paca_columns_placed_by_a_plain_forward_reach_the_next_routed_forward(mixed):
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    names = ["paca", None]
    mixed(tokens, adapter_names=names)
    lt.use(mixed, "paca")
    mixed(tokens)  # places PaCA's columns into the base weight
    layer = next(m for m in mixed.modules() if type(m).__name__ == "PaCALayer")
    layer.paca_delta.data.mul_(3)
    expected = torch.cat([alone(mixed, name, tokens[i:i + 1]) for i, name in enumerate(names)])
    torch.testing.assert_close(mixed(tokens, adapter_names=names).logits, expected, **TOL)


@pytest.mark.parametrize("names, message", [
    (["lora", "nope"], "adapter_names names 'nope', which is not attached (attached: lora, dora, ia3, paca, rs"),
    (["lora"], "adapter_names has 1 entries but the batch has 2 rows"),
    ("lora", "adapter_names must be a list with one adapter name (or None) per batch row"),
])
def test_bad_adapter_names_are_one_sentence(mixed, names, message):
    tokens = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(5))
    with pytest.raises(LeantuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mixed(tokens, adapter_names=names)
    mixed(tokens)  # the model still works afterwards


def test_methods_without_a_row_form_merged_adapters_and_dropout_in_training_are_refused(tiny_llama):
    tokens = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(6))
    lt.attach(tiny_llama, lt.LoRA(r=2, dropout=0.1), adapter_name="a")
    with pytest.raises(LeantuneError, match="runs adapters for inference"):
        tiny_llama.train()(tokens, adapter_names=["a", None])
    tiny_llama.eval()
    lt.merge(tiny_llama, "a")
    with pytest.raises(LeantuneError, match="adapter 'a' is merged into the base weights; lt.unmerge it"):
        tiny_llama(tokens, adapter_names=["a", None])
    lt.unmerge(tiny_llama, "a")
    lt.attach(tiny_llama, lt.PrefixTuning(num_virtual_tokens=2), adapter_name="p")
    with pytest.raises(LeantuneError, match="adapter 'p' is prefix, which cannot run one per batch row"):
        tiny_llama(tokens, adapter_names=["a", None])


def test_rows_on_a_model_with_biases_scale_them_as_each_method_does():
    model = lt.load_model("tiny-qwen2")  # biases on q, k and v
    lt.attach(model, lt.IA3(targets=["q_proj", "k_proj", "down_proj"], feedforward=["down_proj"]), adapter_name="ia3")
    lt.attach(model, lt.DoRA(r=2, alpha=4), adapter_name="dora")
    lt.attach(model, lt.PaCA(r=2, alpha=4), adapter_name="paca")
    randomize_adapter(model, seed=7)
    model.eval()
    tokens = torch.randint(0, 256, (4, 6), generator=torch.Generator().manual_seed(7))
    names = ["ia3", "dora", None, "paca"]
    expected = torch.cat([alone(model, name, tokens[i:i + 1]) for i, name in enumerate(names)])
    torch.testing.assert_close(model(tokens, adapter_names=names).logits, expected, **TOL)
