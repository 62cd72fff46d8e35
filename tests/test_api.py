import os
import stat

import pytest
import torch

import leantune as lt
from conftest import TwoLayer, randomize_adapter
from leantune.errors import LeantuneError
from leantune.methods.layer import AdapterLayer


def test_summary_counts_and_table(plain_module, capsys):
    lt.attach(plain_module, lt.LoRA(r=2))
    info = lt.summary(plain_module, print_table=True)
    expected = 2 * (16 + 24) + 2 * (24 + 16)
    assert info["trainable"] == expected
    assert info["adapters"]["default"] == {"method": "lora", "trainable": expected, "modules": 2}
    assert info["total"] == expected + sum(p.numel() for p in TwoLayer().parameters())
    assert "trainable" in capsys.readouterr().out


def test_two_named_adapters_stack_and_detach_in_any_order(plain_module):
    x = torch.randn(3, 16)
    base = plain_module(x)
    lt.attach(plain_module, lt.LoRA(r=2), adapter_name="a")
    randomize_adapter(plain_module, seed=1)
    lt.attach(plain_module, lt.LoRA(r=3), adapter_name="b")
    randomize_adapter(plain_module, seed=2)
    both = plain_module(x)
    lt.merge(plain_module)
    torch.testing.assert_close(plain_module(x), both, rtol=1e-5, atol=1e-6)
    lt.unmerge(plain_module)
    with lt.disabled(plain_module):
        torch.testing.assert_close(plain_module(x), base, rtol=0, atol=0)
    lt.detach(plain_module, "a")
    assert list(lt.attached(plain_module)) == ["b"]
    lt.detach(plain_module, "b")
    torch.testing.assert_close(plain_module(x), base, rtol=0, atol=0)
    assert all(p.requires_grad for p in plain_module.parameters())


def test_unknown_adapter_name_is_an_error(plain_module):
    lt.attach(plain_module, lt.LoRA(r=2))
    with pytest.raises(lt.LeantuneError, match="no adapter named 'other'"):
        lt.merge(plain_module, "other")


def test_attach_rejects_non_configs(plain_module):
    with pytest.raises(lt.LeantuneError, match="method config"):
        lt.attach(plain_module, {"name": "lora"})


def test_save_never_damages_existing_adapter_on_failure(plain_module, tmp_path, monkeypatch):
    lt.attach(plain_module, lt.LoRA(r=2))
    randomize_adapter(plain_module)
    target = tmp_path / "adapter"
    lt.save_adapter(plain_module, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("leantune.files.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lt.save_adapter(plain_module, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp leftovers


def test_saved_files_follow_the_umask_not_private_temp_modes(plain_module, tmp_path):
    from leantune.files import atomic_write_text

    lt.attach(plain_module, lt.LoRA(r=2))
    old = os.umask(0o027)
    try:
        lt.save_adapter(plain_module, tmp_path / "adapter")
        atomic_write_text(tmp_path / "note.txt", "text")
    finally:
        os.umask(old)
    for path in [*(tmp_path / "adapter").iterdir(), tmp_path / "note.txt"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name


@pytest.mark.parametrize("content, culprit", [
    (None, "does not exist"), ("{not json", "not valid JSON"), ('{"format": "other"}', "not a leantune adapter"),
])
def test_load_adapter_bad_directories(tmp_path, plain_module, content, culprit):
    path = tmp_path / "adapter"
    if content is not None:
        path.mkdir()
        (path / "adapter_config.json").write_text(content)
    with pytest.raises(lt.LeantuneError, match=culprit):
        lt.load_adapter(plain_module, path)


def test_load_adapter_into_wrong_model_is_clear_and_leaves_model_clean(tmp_path, tiny_llama, plain_module):
    lt.attach(plain_module, lt.LoRA(r=2))
    lt.save_adapter(plain_module, tmp_path / "a")
    with pytest.raises(lt.LeantuneError, match=r"does not fit this model: it was saved on 'an unnamed model', this model is 'tiny-llama'"):
        lt.load_adapter(tiny_llama, tmp_path / "a")
    assert lt.attached(tiny_llama) == {}


def test_an_adapter_from_another_architecture_of_the_same_shapes_is_refused(tmp_path, tiny_llama):
    qwen = lt.load_model("tiny-qwen2")
    lt.attach(qwen, lt.LoRA(r=2))
    lt.save_adapter(qwen, tmp_path / "a")
    with pytest.raises(lt.LeantuneError, match=r"was trained on a qwen2 model \('tiny-qwen2'\), and this model is "
                                               r"llama \('tiny-llama'\): its weights mean nothing here"):
        lt.load_adapter(tiny_llama, tmp_path / "a")
    assert lt.attached(tiny_llama) == {}
    lt.load_adapter(lt.load_model("tiny-qwen2"), tmp_path / "a")  # onto its own architecture, as ever


def test_corrupt_tensor_file_is_a_clear_error(tmp_path, plain_module):
    lt.attach(plain_module, lt.LoRA(r=2))
    lt.save_adapter(plain_module, tmp_path / "a")
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(lt.LeantuneError, match="cannot read tensors"):
        lt.load_adapter(TwoLayer(), tmp_path / "a")


def test_cli_help_lists_verbs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "leantune.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in ("train", "eval", "generate", "bench", "sketch", "export"):
        assert verb in out.stdout


def test_disabled_that_cannot_start_leaves_the_model_as_it_was(plain_module):
    lt.attach(plain_module, lt.Full(), adapter_name="b")
    randomize_adapter(plain_module)
    x = torch.randn(3, 16)
    before = plain_module(x)
    with pytest.raises(lt.LeantuneError, match=r"no separate base model to run; attach Full\(keep_base=True\)"):
        with lt.disabled(plain_module):
            pass
    assert lt.api.router(plain_module).switched_off == set()
    torch.testing.assert_close(plain_module(x), before, rtol=0, atol=0)


def test_nested_disabled_blocks_keep_the_base_until_the_outer_one_ends(plain_module):
    x = torch.randn(3, 16)
    base = plain_module(x)
    lt.attach(plain_module, lt.LoRA(r=2), adapter_name="a")
    lt.attach(plain_module, lt.LoRA(r=3), adapter_name="b")
    randomize_adapter(plain_module, seed=3)
    adapted = plain_module(x)
    with lt.disabled(plain_module, "a"):
        only_b = plain_module(x)
        with lt.disabled(plain_module):
            torch.testing.assert_close(plain_module(x), base, rtol=0, atol=0)
        torch.testing.assert_close(plain_module(x), only_b, rtol=0, atol=0)  # 'a' is still off
        with lt.disabled(plain_module, "a"):
            pass
        torch.testing.assert_close(plain_module(x), only_b, rtol=0, atol=0)
    torch.testing.assert_close(plain_module(x), adapted, rtol=0, atol=0)


def _two_forwards(model, tokens):
    with torch.no_grad():
        return model(tokens).logits, model(tokens).logits


@pytest.mark.parametrize("how", ["attach", "load_adapter", "import_peft"])
def test_new_layers_take_the_eval_mode_of_the_model(how, tokens, tmp_path):
    """Dropout > 0 must not run at inference on a model in eval mode, however the adapter arrived."""
    config = lt.LoRA(r=4, alpha=8, dropout=0.5)
    model = lt.load_model("tiny-llama").eval()
    if how == "attach":
        lt.attach(model, config)
    else:
        trained = lt.attach(lt.load_model("tiny-llama"), config)
        randomize_adapter(trained)
        if how == "load_adapter":
            lt.load_adapter(model, lt.save_adapter(trained, tmp_path / "adapter"))
        else:
            lt.import_peft(model, lt.export_peft(trained, tmp_path / "peft"))
    randomize_adapter(model, seed=3)
    first, second = _two_forwards(model, tokens)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not any(m.training for m in model.modules())
    model.train()
    first, second = _two_forwards(model, tokens)
    assert not torch.allclose(first, second)  # dropout is live again in training mode


@pytest.mark.parametrize("config, culprit", [
    (lambda: lt.LoRA(r=10**12), r"'r' = 1000000000000 exceeds the rank 64 that 'model.layers.0.self_attn.q_proj'"),
    (lambda: lt.DoRA(r=65, targets=["q_proj"]), r"dora: 'r' = 65 exceeds the rank 64"),
    (lambda: lt.PaCA(r=10**12), r"paca: 'r' = 1000000000000 is larger than the 64 input features"),
])
def test_sizes_beyond_the_layer_are_refused_before_anything_changes(config, culprit, tiny_llama, tokens):
    before = tiny_llama(tokens).logits
    with pytest.raises(LeantuneError, match=culprit):
        lt.attach(tiny_llama, config())
    assert lt.attached(tiny_llama) == {}
    assert not any(isinstance(m, AdapterLayer) for m in tiny_llama.modules())
    torch.testing.assert_close(tiny_llama(tokens).logits, before, rtol=0, atol=0)


def test_bitfit_adapter_on_a_model_without_biases_names_both_models(tmp_path):
    """Not bitfit's attach advice (add_bias=True): the saved adapter fits another model."""
    qwen2 = lt.attach(lt.load_model("tiny-qwen2"), lt.BitFit())
    lt.save_adapter(qwen2, tmp_path / "bitfit")
    llama = lt.load_model("tiny-llama")
    with pytest.raises(LeantuneError) as caught:
        lt.load_adapter(llama, tmp_path / "bitfit")
    message = str(caught.value)
    assert "a qwen2 model ('tiny-qwen2'), and this model is llama ('tiny-llama')" in message
    assert "add_bias" not in message
    assert lt.attached(llama) == {}


def _out(model, x):
    with torch.no_grad():
        return model(x)


def test_use_chooses_what_a_plain_forward_runs():
    """lt.use(model, "a") runs adapter a alone, exactly as a model that only ever had a; None is the base."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    model = TwoLayer()
    base = _out(model, x)
    only_a = TwoLayer()
    only_a.load_state_dict(model.state_dict())
    lt.attach(model, lt.LoRA(r=2), adapter_name="a")
    lt.attach(model, lt.PaCA(r=3), adapter_name="b")
    randomize_adapter(model)
    stacked = _out(model, x)
    lt.attach(only_a, lt.LoRA(r=2), adapter_name="a")
    with torch.no_grad():
        only_a.up.lora_A.copy_(model.up.base_layer.lora_A)
        only_a.up.lora_B.copy_(model.up.base_layer.lora_B)
        only_a.down.lora_A.copy_(model.down.base_layer.lora_A)
        only_a.down.lora_B.copy_(model.down.base_layer.lora_B)

    lt.use(model, "a")
    torch.testing.assert_close(_out(model, x), _out(only_a, x), rtol=0, atol=0)
    lt.use(model, None)
    torch.testing.assert_close(_out(model, x), base, rtol=0, atol=0)
    lt.use(model, ["a", "b"])
    torch.testing.assert_close(_out(model, x), stacked, rtol=0, atol=0)
    with pytest.raises(LeantuneError, match="no adapter named 'c' is attached"):
        lt.use(model, "c")


def test_use_refuses_to_leave_out_a_merged_adapter_and_to_run_inside_disabled(plain_module):
    lt.attach(plain_module, lt.LoRA(r=2), adapter_name="a")
    lt.attach(plain_module, lt.LoRA(r=2), adapter_name="b")
    lt.merge(plain_module, "a")
    with pytest.raises(LeantuneError, match="adapter 'a' is merged into the base weights; lt.unmerge it"):
        lt.use(plain_module, "b")
    lt.unmerge(plain_module)
    with lt.disabled(plain_module), pytest.raises(LeantuneError, match="inside an lt.disabled block"):
        lt.use(plain_module, "b")


def test_an_adapter_attached_after_use_runs_and_a_detached_one_leaves_the_choice(plain_module):
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    lt.attach(plain_module, lt.LoRA(r=2), adapter_name="a")
    lt.use(plain_module, None)
    base = _out(plain_module, x)
    lt.attach(plain_module, lt.BitFit(), adapter_name="b")
    randomize_adapter(plain_module)
    with lt.disabled(plain_module, "b"):
        torch.testing.assert_close(_out(plain_module, x), base, rtol=0, atol=0)  # a stays out
    assert not torch.allclose(_out(plain_module, x), base)  # b runs
    lt.detach(plain_module, "b")
    torch.testing.assert_close(_out(plain_module, x), base, rtol=0, atol=0)


def test_use_switches_full_fine_tuning_like_disabled(tiny_llama, tokens):
    before = tiny_llama(tokens).logits.detach()
    lt.attach(tiny_llama, lt.Full(keep_base=True))
    randomize_adapter(tiny_llama, scale=0.05)
    tuned = tiny_llama(tokens).logits.detach()
    lt.use(tiny_llama, None)
    torch.testing.assert_close(tiny_llama(tokens).logits, before, rtol=0, atol=0)
    lt.use(tiny_llama, "default")
    torch.testing.assert_close(tiny_llama(tokens).logits, tuned, rtol=0, atol=0)


def test_merge_folds_in_only_what_a_plain_forward_runs(tiny_llama, tokens):
    lt.attach(tiny_llama, lt.LoRA(r=4), "A")
    lt.attach(tiny_llama, lt.LoRA(r=4, targets=["q_proj"]), "B")
    randomize_adapter(tiny_llama)
    lt.use(tiny_llama, "A")
    only_a = tiny_llama(tokens).logits.detach()
    with pytest.raises(LeantuneError, match="adapter 'B' is left out by lt.use"):
        lt.merge(tiny_llama, "B")
    lt.merge(tiny_llama)
    torch.testing.assert_close(tiny_llama(tokens).logits, only_a, rtol=1e-4, atol=1e-5)
    lt.unmerge(tiny_llama)
    lt.use(tiny_llama, ["A", "B"])
    with lt.disabled(tiny_llama, "B"):
        torch.testing.assert_close(tiny_llama(tokens).logits, only_a, rtol=0, atol=0)


@pytest.mark.parametrize("inner", [lambda: lt.LoRA(r=4), lambda: lt.PaCA(r=8), lambda: lt.IA3()])
def test_pissa_on_top_of_another_adapter_is_refused(inner, tiny_llama):
    lt.attach(tiny_llama, inner(), "A")
    with pytest.raises(LeantuneError, match=r"init 'pissa' rewrites the base weight, but '.*' already carries a "
                                            r"(lora|paca|ia3) adapter; attach the PiSSA adapter first"):
        lt.attach(tiny_llama, lt.LoRA(r=2, init="pissa"), "B")
    assert list(lt.attached(tiny_llama)) == ["A"]


def test_full_fine_tuning_shares_a_model_with_no_other_adapter(tiny_llama):
    lt.attach(tiny_llama, lt.Full(keep_base=True), "F")
    with pytest.raises(LeantuneError, match="adapter 'F' is full fine-tuning, which trains every weight"):
        lt.attach(tiny_llama, lt.LoRA(r=2), "L")
    other = lt.attach(lt.load_model("tiny-llama"), lt.LoRA(r=2), "L")
    with pytest.raises(LeantuneError, match="full fine-tuning trains every weight of the model, but adapter 'L'"):
        lt.attach(other, lt.Full(), "F")


def test_an_inner_adapter_saves_and_exports_under_the_bare_module_names(tiny_llama, tokens, tmp_path):
    from peft import PeftModel

    lt.attach(tiny_llama, lt.LoRA(r=2), "A")
    randomize_adapter(tiny_llama)
    with torch.no_grad():
        only_a = tiny_llama(tokens).logits
    lt.attach(tiny_llama, lt.LoRA(r=2), "B")
    lt.save_adapter(tiny_llama, tmp_path / "a", adapter_name="A")
    lt.export_peft(tiny_llama, tmp_path / "peft", adapter_name="A")
    loaded = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "a")
    torch.testing.assert_close(loaded(tokens).logits, only_a, rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(lt.load_model("tiny-llama"), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, only_a, rtol=1e-5, atol=1e-5)


def test_adapter_names_none_is_the_plain_forward(tiny_llama, tokens):
    lt.attach(tiny_llama, lt.LoRA(r=2))
    torch.testing.assert_close(tiny_llama(tokens, adapter_names=None).logits, tiny_llama(tokens).logits,
                               rtol=0, atol=0)


def test_stacking_on_a_quantized_base_names_the_adapter_not_a_class(tiny_llama):
    lt.attach(tiny_llama, lt.LoRA(r=2, quantize="nf4"), "q")
    with pytest.raises(LeantuneError, match="carries a lora adapter whose base lora cannot wrap") as caught:
        lt.attach(tiny_llama, lt.LoRA(r=2, targets=["q_proj"]), "x")
    assert "NF4Linear" not in str(caught.value)
    with pytest.raises(LeantuneError, match="targets 'all-linear' found no plain linear: the linears carry a lora"):
        lt.attach(tiny_llama, lt.LoRA(r=2), "y")


def test_switched_off_wrappers_are_passed_by_without_changing_any_output(tiny_llama, tokens, monkeypatch):
    """A plain forward skips the switched-off adapters' wrappers that only pass their input on
    (methods/layer.py `_first_running`); every selection gives exactly what calling through each of
    them gives, PiSSA's off-path (its own W0) still runs, and a hook on a skipped wrapper still fires."""
    from leantune.methods import layer as layer_module

    lt.attach(tiny_llama, lt.LoRA(r=2, init="pissa"), "p")
    for name, config in (("a", lt.LoRA(r=4)), ("b", lt.IA3()), ("c", lt.LoRA(r=2))):
        lt.attach(tiny_llama, config, name)
    randomize_adapter(tiny_llama)
    selections = [None, "p", "a", "b", "c", ["a", "c"], ["p", "b"]]

    def outputs():
        found = []
        for chosen in selections:
            lt.use(tiny_llama, chosen)
            with torch.no_grad():
                found.append(tiny_llama(tokens).logits)
        with lt.disabled(tiny_llama), torch.no_grad():
            found.append(tiny_llama(tokens).logits)
        return found

    fast = outputs()
    with monkeypatch.context() as patch:
        patch.setattr(layer_module, "_first_running", lambda module: module)
        slow = outputs()
    for got, want in zip(fast, slow):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(fast[1], fast[2])

    lt.use(tiny_llama, "p")
    chain = [tiny_llama.model.layers[0].mlp.down_proj]  # c over b over a over p
    while isinstance(chain[-1].base_layer, AdapterLayer):
        chain.append(chain[-1].base_layer)
    assert [m.adapter_name for m in chain] == ["c", "b", "a", "p"]
    assert layer_module._first_running(chain[1]) is chain[-1]
    chain[2].forward = chain[2].forward  # replaced on the instance (as accelerate's hooks do): not passed by
    assert layer_module._first_running(chain[1]) is chain[2]
    del chain[2].forward

    calls = []
    middle = next(m for m in tiny_llama.modules() if isinstance(m, AdapterLayer) and m.adapter_name == "b")
    middle.register_forward_hook(lambda *_: calls.append(1))
    lt.use(tiny_llama, "p")
    with torch.no_grad():
        tiny_llama(tokens)
    assert calls


def test_summary_counts_a_4bit_base_as_the_dense_weights_it_stands_for():
    """NF4 codes are buffers: counted by parameters alone, QLoRA's total left out every base weight
    (41,280 of tiny-llama's 115,008 with the adapter, so 19.8% trainable instead of 7.1%)."""
    dense = lt.summary(lt.attach(lt.load_model("tiny-llama"), lt.LoRA(r=4)))
    for config in (lt.LoRA(r=4, quantize="nf4"), lt.PaCA(r=4, quantize="nf4")):
        four_bit = lt.summary(lt.attach(lt.load_model("tiny-llama"), config))
        base = sum(p.numel() for p in lt.load_model("tiny-llama").parameters())
        assert four_bit["total"] == base + four_bit["trainable"]
    assert dense["total"] == base + dense["trainable"]
