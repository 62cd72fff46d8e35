"""Bottleneck adapters against the plain model with the adapter math written out by hand around the
same sublayers (forward hooks on a copy, float64), and what they refuse."""
import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

import leantune as lt
from conftest import TwoLayer, randomize_adapter
from leantune.cli import main
from leantune.methods.adapter import BottleneckLayer

SUBLAYER_NAMES = {"ffn": ["mlp"], "attn": ["self_attn"], "both": ["self_attn", "mlp"]}
REFUSAL = r"adapter 'default' \(adapter\) cannot be merged into the base weights: its update is not a change of weights"


def hand_built_reference(model, adapted, scale, activation, parallel):
    """A copy of `model` without adapter layers whose sublayers get h + s · W_up σ(W_down ·) by forward hooks,
    with leaf copies of the adapter tensors; returns (copy, {adapter tensor name: leaf})."""
    act = {"relu": torch.relu, "silu": F.silu}[activation]
    reference = copy.deepcopy(model)
    leaves = {}
    for name, layer in adapted:
        down = layer.adapter_down.detach().clone().requires_grad_(True)
        up = layer.adapter_up.detach().clone().requires_grad_(True)
        leaves[f"{name}.adapter_down"], leaves[f"{name}.adapter_up"] = down, up

        def hook(module, args, kwargs, output, down=down, up=up):
            x = args[0] if args else kwargs["hidden_states"]
            h = output[0] if isinstance(output, tuple) else output
            source = x if parallel else h
            y = h + scale * (act(source @ down.t()) @ up.t())
            return (y, *output[1:]) if isinstance(output, tuple) else y

        reference.get_submodule(name).register_forward_hook(hook, with_kwargs=True)
    return reference, leaves


CASES = [("serial", "ffn", "relu", 1.0), ("serial", "attn", "silu", 0.5), ("serial", "both", "relu", 1.0),
         ("parallel", "ffn", "relu", 4.0), ("parallel", "attn", "relu", 2.0), ("parallel", "both", "silu", 4.0)]


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("placement, where, activation, scale", CASES)
def test_forward_and_gradients_match_the_hand_built_reference(model_name, placement, where, activation, scale):
    torch.manual_seed(0)
    base = lt.load_model(model_name, dtype=torch.float64)
    reference_base = copy.deepcopy(base)
    embeds = torch.randn(2, 7, base.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        base_logits = base(inputs_embeds=embeds).logits
    lt.attach(base, lt.Adapter(bottleneck=8, placement=placement, where=where, activation=activation, scale=scale))
    adapted = [(n, m) for n, m in base.named_modules() if isinstance(m, BottleneckLayer)]
    assert sorted({n.split(".")[-1] for n, _ in adapted}) == sorted(SUBLAYER_NAMES[where])
    assert len(adapted) == base.config.num_hidden_layers * len(SUBLAYER_NAMES[where])
    with torch.no_grad():  # W_up = 0: the start is the base model, exactly
        torch.testing.assert_close(base(inputs_embeds=embeds).logits, base_logits, rtol=0, atol=0)

    randomize_adapter(base, scale=0.3)
    reference, leaves = hand_built_reference(reference_base, adapted, scale, activation, placement == "parallel")
    x = embeds.clone().requires_grad_(True)
    x_ref = embeds.clone().requires_grad_(True)
    out = base(inputs_embeds=x).logits
    expected = reference(inputs_embeds=x_ref).logits
    assert (out - base_logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    params = dict(base.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == set(leaves)
    for name, leaf in leaves.items():
        assert leaf.grad.abs().sum() > 0, name
        torch.testing.assert_close(params[name].grad, leaf.grad, rtol=1e-10, atol=1e-12)


def test_float32_start_is_the_base_exactly_and_save_load_is_exact(tokens, tmp_path):
    model = lt.load_model("tiny-qwen2")
    base = model(tokens).logits.detach()
    config = lt.Adapter(reduction=16, placement="parallel", where="both", scale=4.0)
    lt.attach(model, config)
    torch.testing.assert_close(model(tokens).logits, base, rtol=0, atol=0)
    randomize_adapter(model)
    adapted = model(tokens).logits.detach()
    lt.save_adapter(model, tmp_path / "adapter")
    fresh = lt.load_adapter(lt.load_model("tiny-qwen2"), tmp_path / "adapter")
    assert lt.attached(fresh)["default"].to_dict() == config.to_dict()
    torch.testing.assert_close(fresh(tokens).logits, adapted, rtol=0, atol=0)
    with lt.disabled(fresh):
        torch.testing.assert_close(fresh(tokens).logits, base, rtol=0, atol=0)


def test_sizes_and_trainable_parameters():
    model = lt.load_model("tiny-llama")  # hidden 64, 2 blocks
    lt.attach(model, lt.Adapter())  # bottleneck 64 after each mlp: W_down 64 x 64, W_up 64 x 64
    assert lt.summary(model)["trainable"] == 2 * 2 * 64 * 64
    layer = model.model.layers[0].mlp
    assert layer.adapter_down.shape == (64, 64) and layer.adapter_up.shape == (64, 64)
    assert torch.count_nonzero(layer.adapter_up) == 0 and torch.count_nonzero(layer.adapter_down) == 64 * 64
    lt.detach(model)
    lt.attach(model, lt.Adapter(reduction=16, where="both"))  # 64 // 16 = 4 features
    assert lt.summary(model)["trainable"] == 2 * 2 * 2 * 4 * 64


def test_targets_name_the_sublayers_of_other_models():
    torch.manual_seed(0)
    block = torch.nn.Sequential(TwoLayer(dim=16, hidden=24))  # "0" maps 16 features to 16
    x = torch.randn(3, 16)
    before = block(x).detach()
    lt.attach(block, lt.Adapter(bottleneck=4, targets=["0"]))
    torch.testing.assert_close(block(x), before, rtol=0, atol=0)
    randomize_adapter(block)
    layer = block[0]
    expected = before + torch.relu(before @ layer.adapter_down.t()) @ layer.adapter_up.t()
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("kwargs, culprit", [
    ({"bottleneck": 8, "reduction": 4}, "give 'bottleneck' or 'reduction', not both"),
    ({"bottleneck": 0}, "adapter: 'bottleneck' must be an integer >= 1"),
    ({"reduction": 1.5}, "adapter: 'reduction' must be an integer >= 1"),
    ({"placement": "beside"}, "adapter: 'placement' must be one of"),
    ({"where": "mlp"}, "adapter: 'where' must be one of"),
    ({"activation": "gelu"}, "adapter: 'activation' must be one of"),
    ({"scale": "big"}, "adapter: 'scale' must be a number"),
    ({"targets": "all-linear"}, "adapters wrap whole sublayers"),
])
def test_bad_config_values_name_the_key(kwargs, culprit):
    with pytest.raises(lt.LeantuneError, match=culprit):
        lt.Adapter(**kwargs)


@pytest.mark.parametrize("config, culprit", [
    (lt.Adapter(bottleneck=65), r"'bottleneck' = 65 is wider than the 64 features of 'model.layers.0.mlp'"),
    (lt.Adapter(reduction=65), r"'reduction' = 65 leaves no bottleneck feature"),
    (lt.Adapter(targets=["up_proj"]), r"target 'model.layers.0.mlp.up_proj' reads 64 features but none of its linears gives 64 out"),
    (lt.Adapter(targets=["act_fn"]), r"target 'model.layers.0.mlp.act_fn' \(SiLUActivation\) holds no linear layer"),
])
def test_targets_that_cannot_hold_the_adapter_are_refused_before_anything_changes(config, culprit, tiny_llama):
    with pytest.raises(lt.LeantuneError, match=culprit):
        lt.attach(tiny_llama, config)
    assert lt.attached(tiny_llama) == {} and not any(isinstance(m, BottleneckLayer) for m in tiny_llama.modules())


def test_the_default_names_missing_from_a_model_say_how_to_name_them(plain_module):
    with pytest.raises(lt.LeantuneError, match=r"target 'mlp' matches no module.*pass targets=\[\.\.\.\]"):
        lt.attach(plain_module, lt.Adapter())


def test_merge_and_merged_export_refuse_with_one_sentence(tiny_llama, tokens, tmp_path):
    lt.attach(tiny_llama, lt.LoRA(r=4, targets=["q_proj"]), adapter_name="lora")
    lt.attach(tiny_llama, lt.Adapter(where="both"))
    randomize_adapter(tiny_llama)
    adapted = tiny_llama(tokens).logits.detach()
    for refuse in (lambda: lt.merge(tiny_llama), lambda: lt.detach(tiny_llama, keep_merged=True),
                   lambda: lt.save_merged_model(tiny_llama, tmp_path / "merged")):
        with pytest.raises(lt.LeantuneError, match=REFUSAL) as caught:
            refuse()
        assert str(caught.value).count(". ") == 0 and "\n" not in str(caught.value)
    # nothing merged, nothing written: the LoRA beside it was not merged either
    assert not any(getattr(m, "merged", False) for m in tiny_llama.modules())
    assert not (tmp_path / "merged").exists() and list(lt.attached(tiny_llama)) == ["lora", "default"]
    torch.testing.assert_close(tiny_llama(tokens).logits, adapted, rtol=0, atol=0)
    lt.merge(tiny_llama, "lora")  # the mergeable one alone still merges
    torch.testing.assert_close(tiny_llama(tokens).logits, adapted, rtol=1e-4, atol=1e-5)


def test_merged_export_of_a_model_whose_adapter_is_left_out_is_allowed(tiny_llama, tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tokens).logits.detach()
    lt.attach(tiny_llama, lt.Adapter())
    randomize_adapter(tiny_llama)
    lt.use(tiny_llama, None)  # a plain forward runs the base: the export is the base
    lt.save_merged_model(tiny_llama, tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(loaded(tokens).logits, base, rtol=1e-5, atol=1e-5)


def test_train_command_with_method_name_adapter(tmp_path, monkeypatch, capsys):
    import leantune.job

    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    lines = [json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)})
             for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(16))]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    results = []
    train = leantune.job.train
    monkeypatch.setattr(leantune.job, "train", lambda *a, **k: results.append(train(*a, **k)) or results[-1])
    status = main(["train", "--set", "model=tiny-llama", "--set", "method.name=adapter", "--set", "data.train=train.jsonl",
                   "--set", "data.eval=null", "--set", "max_steps=2", "--set", "batch_size=4", "--set", "max_length=32",
                   "--set", "unit_test_table=false", "--set", "progress=false", "--set", "out_dir=out"])
    assert status == 0, capsys.readouterr().err
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in steps if "loss" in record]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["method"]["name"] == "adapter"

    trained = results[0].model.eval()
    assert torch.count_nonzero(trained.model.layers[0].mlp.adapter_up) > 0  # two steps moved W_up off zero
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    reloaded = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "out" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, trained(tokens).logits, rtol=0, atol=0)
