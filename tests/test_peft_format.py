"""Interop with Hugging Face PEFT (installed as a test dependency): the same adapter gives the same logits."""
import json

import peft  # a test dependency (the dev extra): a missing peft fails this file instead of skipping it
import pytest
import torch

import leantune as lt
from conftest import randomize_adapter
from leantune.methods.dora import DoRALayer
from leantune.methods.ia3 import IA3Layer
from leantune.methods.lora import LoRALayer

PEFT_PREFIX = "base_model.model."


def _peft_model(config):
    return peft.get_peft_model(lt.load_model("tiny-llama"), config).eval()


def _randomize_peft(model, seed=2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_lora_weights_copied_into_a_peft_lora_model_give_the_same_logits(tiny_llama, tokens):
    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"]))
    randomize_adapter(tiny_llama)
    expected = _logits(tiny_llama, tokens)
    reference = _peft_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    copied = 0
    with torch.no_grad():
        for name, module in tiny_llama.named_modules():
            if isinstance(module, LoRALayer):
                target = reference.base_model.model.get_submodule(name)
                target.lora_A["default"].weight.copy_(module.lora_A)
                target.lora_B["default"].weight.copy_(module.lora_B)
                copied += 1
    assert copied == 6
    torch.testing.assert_close(_logits(reference, tokens), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [
    lt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]),
    lt.LoRA(r=4, alpha=6, rslora=True),
    lt.DoRA(r=4, alpha=8),
    lt.IA3(),
    lt.IA3(targets=["q_proj", "up_proj", "down_proj"], feedforward=["up_proj", "down_proj"]),
], ids=["lora", "lora-rslora-all-linear", "dora", "ia3", "ia3-two-feedforward"])
def test_export_loads_in_peft_with_the_same_logits(config, tiny_llama, tokens, tmp_path):
    lt.attach(tiny_llama, config)
    randomize_adapter(tiny_llama)
    expected = _logits(tiny_llama, tokens)
    lt.export_peft(tiny_llama, tmp_path / "peft")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(lt.load_model("tiny-llama"), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(loaded, tokens), expected, rtol=1e-5, atol=1e-5)


def test_exported_config_uses_short_module_names(tiny_llama, tmp_path):
    lt.attach(tiny_llama, lt.DoRA(r=4, alpha=8, targets=["q_proj", "v_proj"], dropout=0.1))
    lt.export_peft(tiny_llama, tmp_path / "peft")
    document = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert document["peft_type"] == "LORA" and document["use_dora"] is True
    assert (document["r"], document["lora_alpha"], document["lora_dropout"]) == (4, 8, 0.1)
    assert document["target_modules"] == ["q_proj", "v_proj"] and document["task_type"] == "CAUSAL_LM"


def test_pissa_exports_as_plain_lora_on_the_original_base(tiny_llama, tokens, tmp_path):
    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8, init="pissa", targets=["q_proj", "o_proj"]))
    randomize_adapter(tiny_llama, scale=0.01)
    expected = _logits(tiny_llama, tokens)
    lt.export_peft(tiny_llama, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 8
    loaded = peft.PeftModel.from_pretrained(lt.load_model("tiny-llama"), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(loaded, tokens), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config, layer_type", [
    (lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "gate_proj"]), LoRALayer),
    (lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_rslora=True), LoRALayer),
    (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"], use_dora=True), DoRALayer),
    (lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), IA3Layer),
], ids=["lora", "lora-rslora-all-linear", "dora", "ia3"])
def test_import_of_a_peft_adapter_gives_the_same_logits(config, layer_type, tokens, tmp_path):
    reference = _peft_model(config())
    _randomize_peft(reference)
    expected = _logits(reference, tokens)
    reference.save_pretrained(tmp_path / "peft")
    model = lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    assert sum(isinstance(m, layer_type) for m in model.modules()) > 0
    assert all(n.split(".")[-1] in ("lora_A", "lora_B", "magnitude", "ia3_l")
               for n, p in model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(_logits(model, tokens), expected, rtol=1e-5, atol=1e-5)


def test_imported_adapter_saves_and_reloads_as_a_leantune_adapter(tokens, tmp_path):
    reference = _peft_model(peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                           feedforward_modules=["down_proj"]))
    _randomize_peft(reference)
    reference.save_pretrained(tmp_path / "peft")
    model = lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    assert sorted(lt.attached(model)["default"].targets) == ["down_proj", "k_proj", "v_proj"]
    lt.save_adapter(model, tmp_path / "leantune")
    again = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "leantune")
    torch.testing.assert_close(_logits(again, tokens), _logits(model, tokens), rtol=0, atol=0)


def test_round_trip_export_then_import_is_exact(tiny_llama, tokens, tmp_path):
    lt.attach(tiny_llama, lt.DoRA(r=4, alpha=8, targets=["k_proj", "o_proj"]))
    randomize_adapter(tiny_llama)
    expected = _logits(tiny_llama, tokens)
    lt.export_peft(tiny_llama, tmp_path / "peft")
    model = lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    torch.testing.assert_close(_logits(model, tokens), expected, rtol=0, atol=0)


def test_pickled_adapter_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (folder / "adapter_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(lt.LeantuneError, match="adapter_model.bin, a pickle that leantune never loads"):
        lt.import_peft(lt.load_model("tiny-llama"), folder)


def test_unsupported_peft_type_and_options_are_named(tmp_path):
    reference = _peft_model(peft.LoraConfig(r=2, target_modules=["q_proj"]))
    reference.save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    document = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**document, "peft_type": "PROMPT_TUNING"}))
    with pytest.raises(lt.LeantuneError, match="of type 'PROMPT_TUNING'; leantune imports LORA"):
        lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    config_path.write_text(json.dumps({**document, "bias": "all"}))
    model = lt.load_model("tiny-llama")
    with pytest.raises(lt.LeantuneError, match="PEFT option bias='all' is not supported"):
        lt.import_peft(model, tmp_path / "peft")
    assert lt.attached(model) == {}


def test_tensor_shapes_that_do_not_fit_leave_the_model_unchanged(tmp_path):
    reference = peft.get_peft_model(lt.load_model("tiny-llama", vocab_size=600),
                                    peft.LoraConfig(r=2, target_modules=["q_proj"]))
    reference.save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 3}))
    model = lt.load_model("tiny-llama")
    with pytest.raises(lt.LeantuneError, match=r"lora_A' has shape \(2, 64\), the model expects \(3, 64\)"):
        lt.import_peft(model, tmp_path / "peft")
    assert lt.attached(model) == {} and not any(isinstance(m, LoRALayer) for m in model.modules())


def test_methods_without_a_peft_equivalent_are_refused(tmp_path):
    model = lt.load_model("tiny-qwen2")
    lt.attach(model, lt.BitFit())
    with pytest.raises(lt.LeantuneError, match="cannot be written in Hugging Face PEFT format"):
        lt.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_command_writes_a_peft_adapter(tiny_llama, tokens, tmp_path):
    from leantune.cli import main

    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize_adapter(tiny_llama)
    expected = _logits(tiny_llama, tokens)
    lt.save_adapter(tiny_llama, tmp_path / "adapter")
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    loaded = peft.PeftModel.from_pretrained(lt.load_model("tiny-llama"), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(loaded, tokens), expected, rtol=1e-5, atol=1e-5)
    # an existing output is not overwritten without --force
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "peft")]) == 2
    assert main(["export", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_paca_exports_as_lora_and_leaves_the_model_as_it_was(tiny_llama, tokens, tmp_path):
    lt.attach(tiny_llama, lt.PaCA(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    randomize_adapter(tiny_llama)
    expected = _logits(tiny_llama, tokens)
    lt.export_peft(tiny_llama, tmp_path / "peft")
    assert lt.attached(tiny_llama)["default"].method_name == "paca"
    loaded = peft.PeftModel.from_pretrained(lt.load_model("tiny-llama"), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(loaded, tokens), expected, rtol=1e-5, atol=1e-5)
