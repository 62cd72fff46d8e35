"""Interop with Hugging Face PEFT (installed as a test dependency): the same adapter gives the same logits."""
import json
import re

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


def test_lora_fa_trains_what_peft_lora_fa_trains_with_the_same_gradients(tiny_llama, tokens):
    from peft.optimizers import create_lorafa_optimizer

    targets = ["q_proj", "v_proj", "up_proj"]
    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8, freeze_a=True, targets=targets))
    randomize_adapter(tiny_llama)
    reference = _peft_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    create_lorafa_optimizer(reference, r=4, lora_alpha=8, lr=1e-3)  # freezes every lora_A
    with torch.no_grad():
        for name, module in tiny_llama.named_modules():
            if isinstance(module, LoRALayer):
                target = reference.base_model.model.get_submodule(name)
                target.lora_A["default"].weight.copy_(module.lora_A)
                target.lora_B["default"].weight.copy_(module.lora_B)
    tiny_llama(tokens, labels=tokens).loss.backward()
    reference(input_ids=tokens, labels=tokens).loss.backward()
    ours = {n: p for n, p in tiny_llama.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix(PEFT_PREFIX).replace(".default.weight", ""): p
              for n, p in reference.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and len(ours) == 6 and all(n.endswith("lora_B") for n in ours)
    for name, param in ours.items():
        torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", [
    lt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]),
    lt.LoRA(r=4, alpha=6, rslora=True),
    lt.LoRA(r=4, alpha=8, freeze_a=True),  # LoRA-FA is plain LoRA once trained
    lt.DoRA(r=4, alpha=8),
    lt.IA3(),
    lt.IA3(targets=["q_proj", "up_proj", "down_proj"], feedforward=["up_proj", "down_proj"]),
], ids=["lora", "lora-rslora-all-linear", "lora-fa", "dora", "ia3", "ia3-two-feedforward"])
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
    config_path.write_text(json.dumps({**document, "peft_type": "LOKR"}))
    with pytest.raises(lt.LeantuneError, match="of type 'LOKR', which import_peft does not support yet"):
        lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    config_path.write_text(json.dumps({**document, "bias": "all"}))
    model = lt.load_model("tiny-llama")
    with pytest.raises(lt.LeantuneError, match="PEFT option bias='all' in '.*adapter_config.json' is not supported"):
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


@pytest.mark.parametrize("config", [lt.BitFit(), lt.Adapter()], ids=["bitfit", "adapter"])
def test_methods_without_a_peft_equivalent_are_refused(config, tmp_path):
    model = lt.load_model("tiny-qwen2")
    lt.attach(model, config)
    with pytest.raises(lt.LeantuneError, match=f"method '{config.method_name}' cannot be written in Hugging Face PEFT format"):
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


# -- what import_peft refuses, checked against what PEFT itself does with the same files -----

def _saved_peft_adapter(config, folder, **model_kwargs):
    """A PEFT model with random adapter weights, saved by PEFT to `folder`; returns the model."""
    reference = peft.get_peft_model(lt.load_model("tiny-llama"), config, **model_kwargs).eval()
    _randomize_peft(reference)
    reference.save_pretrained(folder)
    return reference


def _edit_config(folder, **changes):
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **changes}))


def _peft_reload(folder):
    return peft.PeftModel.from_pretrained(lt.load_model("tiny-llama"), folder).eval()


def _peft_adapted_modules(model):
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_adapter_whose_init_rewrote_the_base_is_refused(init, tokens, tmp_path):
    _saved_peft_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init),
                        tmp_path / "peft")
    # PEFT redoes the init on the base it loads onto; the same factors on the untouched base are far off
    rewritten = _logits(_peft_reload(tmp_path / "peft"), tokens)
    _edit_config(tmp_path / "peft", init_lora_weights=True)
    untouched = _logits(_peft_reload(tmp_path / "peft"), tokens)
    assert (rewritten - untouched).abs().max() > 1e-2
    _edit_config(tmp_path / "peft", init_lora_weights=init)
    model = lt.load_model("tiny-llama")
    with pytest.raises(lt.LeantuneError, match=rf"init_lora_weights='{init}', an init that rewrites the base weights"
                                               r".*save_pretrained\(\.\.\., path_initial_model_for_weight_conversion="):
        lt.import_peft(model, tmp_path / "peft")
    assert lt.attached(model) == {}


@pytest.mark.parametrize("init, message", [
    ("corda", "init_lora_weights='corda', an init that rewrites the base weights"),
    ("lora_ga", "init_lora_weights='lora_ga', an init that rewrites the base weights"),
    ("loftq", "init_lora_weights='loftq', so its factors apply to the quantized residual LoftQ makes"),
    ("some_new_init", "init_lora_weights='some_new_init', which import_peft does not know"),
])
def test_inits_peft_cannot_run_here_are_refused_by_name(init, message, tmp_path):
    # CorDA, LoRA-GA and LoftQ need data, gradients or scipy to initialise: edit the name into a saved config
    _saved_peft_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "peft")
    _edit_config(tmp_path / "peft", init_lora_weights=init)
    with pytest.raises(lt.LeantuneError, match=message):
        lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapter_converted_for_the_original_base_imports_with_peft_logits(init, tokens, tmp_path):
    reference = peft.get_peft_model(lt.load_model("tiny-llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=init)).eval()
    reference.save_pretrained(tmp_path / "initial")
    _randomize_peft(reference)
    trained = _logits(reference, tokens)
    reference.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    document = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (document["init_lora_weights"], document["r"], document["lora_alpha"]) == (True, 8, 16)
    expected = _logits(_peft_reload(tmp_path / "peft"), tokens)
    torch.testing.assert_close(expected, trained, rtol=1e-5, atol=1e-5)
    model = lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    torch.testing.assert_close(_logits(model, tokens), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["orthogonal", "mica", False])
def test_inits_that_keep_the_base_import_with_peft_logits(init, tokens, tmp_path):
    _saved_peft_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init),
                        tmp_path / "peft")
    model = lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    torch.testing.assert_close(_logits(model, tokens), _logits(_peft_reload(tmp_path / "peft"), tokens),
                               rtol=1e-5, atol=1e-5)


def test_eva_adapter_imports_with_peft_logits(tokens, tmp_path):
    """EVA initialises A from activations and B at zero: the base stays as it was."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    generator = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 512, (4, 32), generator=generator),
                "attention_mask": torch.ones(4, 32, dtype=torch.long)} for _ in range(2)]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="eva",
                             eva_config=peft.EvaConfig(rho=1.0))  # rho=1: the same rank everywhere, no rank_pattern
    reference = peft.get_peft_model(lt.load_model("tiny-llama"), config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(reference, batches, show_progress_bar=False)
    _randomize_peft(reference.eval())
    reference.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_lora_weights"] == "eva"
    model = lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    torch.testing.assert_close(_logits(model, tokens), _logits(_peft_reload(tmp_path / "peft"), tokens),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes", [
    {"layers_to_transform": [0]},
    {"layers_to_transform": 1, "layers_pattern": "layers"},
    {"target_modules": ["q_proj"]},
    {"exclude_modules": ["v_proj"]},
], ids=["layers", "layer-with-pattern", "fewer-targets", "exclude"])
def test_tensors_the_config_leaves_out_are_refused(changes, tmp_path):
    _saved_peft_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "peft")
    saved = _peft_adapted_modules(_peft_reload(tmp_path / "peft"))
    _edit_config(tmp_path / "peft", **changes)
    skipped = saved - _peft_adapted_modules(_peft_reload(tmp_path / "peft"))
    assert skipped  # PEFT loads the rest and drops these tensors without a word
    model = lt.load_model("tiny-llama")
    with pytest.raises(lt.LeantuneError, match=rf"holds tensors for '{sorted(skipped)[0]}' \({len(skipped)} modules "
                                               rf"in all\) that its config's .*{list(changes)[0]}=.* leave out"):
        lt.import_peft(model, tmp_path / "peft")
    assert lt.attached(model) == {}


def test_adapter_made_for_some_layers_imports_with_peft_logits(tokens, tmp_path):
    _saved_peft_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                        layers_pattern="layers"), tmp_path / "peft")
    expected = _peft_reload(tmp_path / "peft")
    assert {n.split(".")[2] for n in _peft_adapted_modules(expected)} == {"1"}
    model = lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    assert {n.split(".")[2] for n, m in model.named_modules() if isinstance(m, LoRALayer)} == {"1"}
    torch.testing.assert_close(_logits(model, tokens), _logits(expected, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes, message", [
    ({"target_modules": ["qkv_proj"]}, r"PEFT target_modules=\['qkv_proj'\] in '.*' select no module"),
    ({"layers_to_transform": [0], "layers_pattern": ["h"]},
     r"PEFT target_modules=\[.*\], layers_to_transform=\[0\], layers_pattern=\['h'\] in '.*' select no module"),
], ids=["unknown-target", "unknown-layers-pattern"])
def test_config_that_selects_no_module_is_refused(changes, message, tmp_path):
    _saved_peft_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "peft")
    _edit_config(tmp_path / "peft", **changes)
    with pytest.raises(ValueError, match="not found in the base model"):
        _peft_reload(tmp_path / "peft")
    with pytest.raises(lt.LeantuneError, match=message):
        lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")


@pytest.mark.parametrize("option, value", [
    ("alora_invocation_tokens", [7, 8]),
    ("trainable_token_indices", [1, 2, 3]),
    ("lora_bias", True),
    ("modules_to_save", ["lm_head"]),
])
def test_peft_options_that_change_the_numbers_are_refused(option, value, tokens, tmp_path):
    tokens = tokens.clone()
    tokens[:, 3:5] = torch.tensor([7, 8])  # aLoRA acts from its invocation tokens on
    extra = {"task_type": "CAUSAL_LM"} if option == "alora_invocation_tokens" else {}
    reference = _saved_peft_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **{option: value}, **extra),
                                    tmp_path / "peft")
    _edit_config(tmp_path / "peft", **{option: peft.LoraConfig().to_dict()[option]})
    assert (_logits(_peft_reload(tmp_path / "peft"), tokens) - _logits(reference, tokens)).abs().max() > 1e-2
    _edit_config(tmp_path / "peft", **{option: value})
    with pytest.raises(lt.LeantuneError, match=rf"PEFT option {option}=.* is not supported by import_peft"):
        lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")


@pytest.mark.parametrize("changes, message", [
    ({"use_qalora": True}, r"PEFT option use_qalora=True in '.*adapter_config.json' is not supported by import_peft"),
    ({"lora_bias": True}, r"PEFT option lora_bias=True in .* is not supported"),
    ({"rank_pattern": {"v_proj": 8}}, r"PEFT option rank_pattern=\{'v_proj': 8\} in .* is not supported .*\(only \{\}\)"),
    ({"target_parameters": ["mlp.experts.down_proj"]}, r"PEFT option target_parameters=.* is not supported"),
    ({"kasa_config": {"beta": 0.1}}, r"PEFT option kasa_config=.* is not supported"),
    ({"future_option": 3}, r"PEFT option future_option=3 in .* is unknown to import_peft, which therefore cannot tell"),
], ids=["qalora", "lora-bias", "rank-pattern", "target-parameters", "kasa", "unknown-key"])
def test_peft_options_without_an_equivalent_are_named(changes, message, tmp_path):
    _saved_peft_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "peft")
    _edit_config(tmp_path / "peft", **changes)
    with pytest.raises(lt.LeantuneError, match=message):
        lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")


def test_options_that_change_nothing_are_ignored(tokens, tmp_path):
    _saved_peft_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "peft")
    _edit_config(tmp_path / "peft", revision="main", peft_version="9.9.9", inference_mode=False, task_type="CAUSAL_LM",
                 future_option=None, megatron_core="megatron.core")
    model = lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    torch.testing.assert_close(_logits(model, tokens), _logits(_peft_reload(tmp_path / "peft"), tokens),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, peft_type", [
    (lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16), "P_TUNING"),
    (lambda: peft.LoHaConfig(r=2, target_modules=["q_proj"]), "LOHA"),
], ids=["p-tuning", "loha"])
def test_other_peft_types_are_named_as_not_supported(config, peft_type, tmp_path):
    peft.get_peft_model(lt.load_model("tiny-llama"), config()).save_pretrained(tmp_path / "peft")
    with pytest.raises(lt.LeantuneError, match=rf"holds a PEFT adapter of type '{peft_type}', which import_peft does "
                                               r"not support yet \(it imports LORA, with or without use_dora, IA3, "
                                               r"PROMPT_TUNING and PREFIX_TUNING\)$"):
        lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")


def test_ia3_feedforward_regex_imports_with_peft_logits(tokens, tmp_path):
    # q_proj is square, so reading the regex as a name would scale its output instead of its input without an error
    _saved_peft_adapter(peft.IA3Config(target_modules=["q_proj", "k_proj"], feedforward_modules=r".*\.q_proj"),
                        tmp_path / "peft")
    model = lt.import_peft(lt.load_model("tiny-llama"), tmp_path / "peft")
    assert [n for n, m in model.named_modules() if isinstance(m, IA3Layer) and m.feedforward] == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(_logits(model, tokens), _logits(_peft_reload(tmp_path / "peft"), tokens),
                               rtol=1e-5, atol=1e-5)


# -- leantune's own adapter documents --------------------------------------------------------

@pytest.mark.parametrize("version", ["x", 1.5, None, True, [1]])
def test_non_integer_format_version_is_named(version, tiny_llama, tmp_path):
    lt.attach(tiny_llama, lt.LoRA(r=2, targets=["q_proj"]))
    lt.save_adapter(tiny_llama, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "format_version": version}))
    message = rf"'{re.escape(str(config_path))}' has format_version {re.escape(repr(version))}, which must be an integer"
    with pytest.raises(lt.LeantuneError, match=message + r" \(this leantune writes 1\)$"):
        lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "adapter")


def test_json_syntax_error_names_line_column_and_what_was_expected(tiny_llama, tmp_path):
    lt.attach(tiny_llama, lt.LoRA(r=2, targets=["q_proj"]))
    lt.save_adapter(tiny_llama, tmp_path / "adapter")
    lt.export_peft(tiny_llama, tmp_path / "peft")
    for folder, load in [(tmp_path / "adapter", lt.load_adapter), (tmp_path / "peft", lt.import_peft)]:
        config_path = folder / "adapter_config.json"
        config_path.write_text('{\n  "format": "leantune-adapter",\n  "r": 4\n  "alpha": 8\n}')
        expected = rf"^'{re.escape(str(config_path))}' is not valid JSON: expecting ',' delimiter at line 4, column 3$"
        with pytest.raises(lt.LeantuneError, match=expected):
            load(lt.load_model("tiny-llama"), folder)
        config_path.write_text('{"format": "leantune-adapter')
        with pytest.raises(lt.LeantuneError, match=r"is not valid JSON: unterminated string starting at line 1, "
                                                   r"column 12$"):
            load(lt.load_model("tiny-llama"), folder)


@pytest.mark.parametrize("config", [lt.LoRA(r=4, alpha=8), lt.PaCA(r=4, alpha=8)], ids=["lora", "paca"])
def test_lora_and_paca_exports_have_the_files_and_keys_vllms_lora_loader_reads(tmp_path, config):
    """vLLM (--enable-lora --lora-modules name=path) reads adapter_config.json and
    adapter_model.safetensors with keys base_model.model.<module>.lora_A/lora_B.weight; it refuses
    DoRA (use_dora) and extra tensors such as magnitudes."""
    from safetensors import safe_open  # only this test reads the file itself

    model = lt.load_model("tiny-llama")
    lt.attach(model, config, adapter_name="x")
    lt.export_peft(model, tmp_path, adapter_name="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    document = json.loads((tmp_path / "adapter_config.json").read_text())
    assert document["peft_type"] == "LORA" and document["r"] == 4 and document["lora_alpha"] == 8
    assert not document.get("use_dora") and document.get("bias", "none") == "none"
    assert not document.get("modules_to_save")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    pattern = re.compile(r"^base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.(\w+)\.lora_[AB]\.weight$")
    assert keys and all(pattern.match(key) for key in keys), [k for k in keys if not pattern.match(k)]
    assert {pattern.match(k).group(2) for k in keys} == set(document["target_modules"])
