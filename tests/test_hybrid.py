"""Hybrid adapters: a list of configs on disjoint targets behaves as one adapter (the contract test
covers disabled / merge / detach / save-load); here: equality with its parts attached one by one,
the errors, and the training job."""
import json

import pytest
import torch

import leantune as lt
from conftest import randomize_adapter
from leantune.errors import LeantuneError
from leantune.methods.layer import AdapterLayer


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_a_list_of_configs_equals_its_parts_attached_as_separate_adapters(tokens):
    parts = [lt.LoRA(r=4, alpha=8, targets=["q_proj"]), lt.PaCA(r=4, alpha=8, targets=["up_proj"])]
    hybrid = lt.attach(lt.load_model("tiny-llama"), parts)
    assert list(lt.attached(hybrid)) == ["default"] and lt.attached(hybrid)["default"].method_name == "hybrid"
    randomize_adapter(hybrid)
    separate = lt.load_model("tiny-llama")
    lt.attach(separate, lt.LoRA(r=4, alpha=8, targets=["q_proj"]), adapter_name="a")
    lt.attach(separate, lt.PaCA(r=4, alpha=8, targets=["up_proj"]), adapter_name="b")
    state = lt.attached(hybrid)["default"].state_dict(hybrid, "default")
    lt.attached(separate)["a"].load_state_dict(separate, "a", {k[2:]: v for k, v in state.items() if k.startswith("0.")})
    lt.attached(separate)["b"].load_state_dict(separate, "b", {k[2:]: v for k, v in state.items() if k.startswith("1.")})
    torch.testing.assert_close(_logits(hybrid, tokens), _logits(separate, tokens), rtol=0, atol=0)
    assert lt.summary(hybrid)["trainable"] == lt.summary(separate)["trainable"]


def test_parts_on_the_same_module_are_refused_and_leave_the_model_clean(tiny_llama, tokens):
    before = _logits(tiny_llama, tokens)
    with pytest.raises(LeantuneError, match=r"hybrid: parts 0 and 1 both adapt 'model.layers.0.self_attn.q_proj'; "
                                            r"the parts of a hybrid adapter need disjoint targets"):
        lt.attach(tiny_llama, [lt.LoRA(r=2, targets=["q_proj"]), lt.PaCA(r=2, targets=["q_proj", "k_proj"])])
    assert lt.attached(tiny_llama) == {} and not any(isinstance(m, AdapterLayer) for m in tiny_llama.modules())
    torch.testing.assert_close(_logits(tiny_llama, tokens), before, rtol=0, atol=0)


def test_a_hybrid_needs_two_parts_and_no_nesting():
    with pytest.raises(LeantuneError, match="hybrid: 'parts' must list at least two method configs"):
        lt.Hybrid(parts=[lt.LoRA()])
    with pytest.raises(LeantuneError, match="each part must be a method config"):
        lt.Hybrid(parts=[lt.LoRA(), lt.Hybrid(parts=[lt.LoRA(), lt.IA3()])])


def test_adapter_names_with_the_part_separator_are_refused(tiny_llama):
    with pytest.raises(LeantuneError, match="adapter_name must be a non-empty string without '/'"):
        lt.attach(tiny_llama, lt.LoRA(r=2), adapter_name="a/0")


def test_the_training_job_trains_and_reloads_a_hybrid(tmp_path, tokens):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i} ", "completion": f"answer {i}"}) + "\n" for i in range(8)))
    method = {"name": "hybrid", "parts": [{"name": "lora", "r": 2, "targets": ["q_proj"]},
                                          {"name": "ia3", "targets": ["v_proj"], "feedforward": []}]}
    result = lt.train({"model": "tiny-llama", "method": method, "data": {"train": str(data), "eval": None},
                       "max_length": 32, "max_steps": 2, "lr": 1e-2, "save_every": 0, "progress": False,
                       "out_dir": str(tmp_path / "out")})
    loaded = lt.load_adapter(lt.load_model("tiny-llama"), result.adapter_dir)
    torch.testing.assert_close(_logits(loaded, tokens), _logits(result.model.eval(), tokens), rtol=0, atol=0)


def test_the_mam_adapter_prefix_tuning_plus_a_parallel_adapter_is_one_adapter(tokens, tmp_path):
    """He et al.'s MAM adapter: a model method (prefixes) and a module method (parallel FFN adapter)."""
    mam = [lt.PrefixTuning(num_virtual_tokens=4), lt.Adapter(bottleneck=8, placement="parallel", where="ffn")]
    model = lt.attach(lt.load_model("tiny-llama"), mam)
    base = lt.load_model("tiny-llama")
    randomize_adapter(model)
    adapted = _logits(model, tokens)
    with lt.disabled(model):
        torch.testing.assert_close(_logits(model, tokens), _logits(base, tokens), rtol=0, atol=0)
    lt.use(model, None)
    torch.testing.assert_close(_logits(model, tokens), _logits(base, tokens), rtol=0, atol=0)
    lt.use(model, "default")
    torch.testing.assert_close(_logits(model, tokens), adapted, rtol=0, atol=0)
    with pytest.raises(LeantuneError, match=r"adapter 'default' \(hybrid\) cannot be merged"):
        lt.merge(model)
    lt.save_adapter(model, tmp_path / "mam")
    loaded = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "mam")
    torch.testing.assert_close(_logits(loaded, tokens), adapted, rtol=0, atol=0)
    lt.detach(model)
    torch.testing.assert_close(_logits(model, tokens), _logits(base, tokens), rtol=0, atol=0)
