"""Merged export: any adapter folded into a plain Hugging Face model folder computes what the adapted model did."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import leantune as lt
from conftest import randomize_adapter
from leantune.cli import main
from leantune.quant import NF4Linear


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


CONFIGS = [
    lt.LoRA(r=4, alpha=8),
    lt.DoRA(r=4, alpha=8, targets=["q_proj", "down_proj"]),
    lt.PaCA(r=4, alpha=8),
    lt.IA3(),
    lt.BitFit(),
    lt.Full(),
    lt.LoRA(r=4, alpha=8, quantize="nf4"),
    lt.PaCA(r=4, alpha=8, quantize="nf4"),
    lt.LoRA(r=4, alpha=8, init="pissa"),  # the base holds a residual: the export must hold residual + update
    lt.DoRA(r=4, alpha=8, init="pissa"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["lora", "dora", "paca", "ia3", "bitfit", "full", "qlora", "qpaca",
                                             "lora-pissa", "dora-pissa"])
def test_merged_model_folder_gives_the_adapted_logits(config, tokens, tmp_path):
    tiny_llama = lt.load_model("tiny-qwen2" if isinstance(config, lt.BitFit) else "tiny-llama")  # qwen2 has biases
    lt.attach(tiny_llama, config)
    randomize_adapter(tiny_llama)
    expected = _logits(tiny_llama, tokens)
    lt.save_merged_model(tiny_llama, tmp_path / "model", lt.load_tokenizer("tiny-llama"))
    assert lt.attached(tiny_llama)["default"] is config  # the merge ran on a copy
    torch.testing.assert_close(_logits(tiny_llama, tokens), expected, rtol=0, atol=0)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    torch.testing.assert_close(_logits(loaded, tokens), expected, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "model" / "tokenizer.json").is_file()


def test_in_place_leaves_the_model_merged_and_detached(tiny_llama, tokens, tmp_path):
    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8, quantize="nf4"))
    randomize_adapter(tiny_llama)
    expected = _logits(tiny_llama, tokens)
    lt.save_merged_model(tiny_llama, tmp_path / "model", in_place=True)
    assert lt.attached(tiny_llama) == {}
    assert not any(isinstance(m, NF4Linear) for m in tiny_llama.modules())  # the update was added in float
    torch.testing.assert_close(_logits(tiny_llama, tokens), expected, rtol=1e-5, atol=1e-5)


def test_two_stacked_adapters_merge_into_one_model(tiny_llama, tokens, tmp_path):
    lt.attach(tiny_llama, lt.LoRA(r=4, alpha=8, targets=["q_proj"]), adapter_name="first")
    lt.attach(tiny_llama, lt.IA3(), adapter_name="second")
    randomize_adapter(tiny_llama)
    expected = _logits(tiny_llama, tokens)
    lt.save_merged_model(tiny_llama, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    torch.testing.assert_close(_logits(loaded, tokens), expected, rtol=1e-5, atol=1e-5)


def test_export_command_writes_a_merged_model(tiny_llama, tokens, tmp_path):
    lt.attach(tiny_llama, lt.PaCA(r=4, alpha=8))
    randomize_adapter(tiny_llama)
    expected = _logits(tiny_llama, tokens)
    lt.save_adapter(tiny_llama, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "merged", "--out", str(out)]) == 0
    torch.testing.assert_close(_logits(lt.load_model(str(out)), tokens), expected, rtol=1e-5, atol=1e-5)
    before = (out / "model.safetensors").read_bytes()
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "merged", "--out", str(out)]) == 2
    assert (out / "model.safetensors").read_bytes() == before


def test_biases_the_architecture_lacks_are_refused(tiny_llama, tmp_path):
    lt.attach(tiny_llama, lt.BitFit(add_bias=True))
    with pytest.raises(lt.LeantuneError, match="does not build"):
        lt.save_merged_model(tiny_llama, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert "default" in lt.attached(tiny_llama)  # the adapter is still there to save


def test_a_model_without_save_pretrained_is_refused(tmp_path):
    from conftest import TwoLayer

    with pytest.raises(lt.LeantuneError, match="needs a Hugging Face model"):
        lt.save_merged_model(TwoLayer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_merged_folder_holds_only_the_adapters_a_plain_forward_runs(tokens, tmp_path):
    model = lt.load_model("tiny-llama")
    lt.attach(model, lt.LoRA(r=4, alpha=8), adapter_name="a")
    lt.attach(model, lt.PaCA(r=4, alpha=8), adapter_name="b")
    randomize_adapter(model)
    lt.use(model, "b")
    expected = _logits(model, tokens)
    lt.save_merged_model(model, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    torch.testing.assert_close(_logits(loaded, tokens), expected, rtol=1e-5, atol=1e-5)
    assert set(lt.attached(model)) == {"a", "b"}  # the caller's model keeps both


@pytest.mark.parametrize("config", [lt.LoRA(r=4, alpha=8, targets=["q_proj", "lm_head"]),
                                    lt.IA3(targets=["k_proj", "lm_head"], feedforward=[])])
def test_an_adapter_on_a_tied_output_head_trains_unmerged_and_refuses_to_merge(tmp_path, config):
    """tiny-llama ties its output head to the input embedding: merging into that weight would change
    the embedding too (the logits moved by 11.6). Unmerged, the adapter changes the head alone."""
    model = lt.load_model("tiny-llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    lt.attach(model, config)
    randomize_adapter(model, scale=0.1)
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).logits
    for merging in (lambda: lt.merge(model), lambda: lt.save_merged_model(model, tmp_path / "merged"),
                    lambda: lt.detach(model, keep_merged=True)):
        with pytest.raises(lt.LeantuneError, match="'model.embed_tokens' shares .*tied input and output embeddings"):
            merging()
    assert not (tmp_path / "merged").exists()
    torch.testing.assert_close(model.model.embed_tokens.weight, embedding, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("config", [lt.PaCA(r=4, targets=["q_proj", "lm_head"]),
                                    lt.LoRA(r=4, init="pissa", targets=["q_proj", "lm_head"]),
                                    [lt.PrefixTuning(num_virtual_tokens=2), lt.PaCA(r=4, targets=["lm_head"])]],
                         ids=["paca", "pissa", "hybrid"])
def test_methods_that_write_into_a_tied_output_head_are_refused_and_leave_the_model_as_it_was(config):
    """PaCA keeps its columns in the weight it adapts and PiSSA leaves the residual there: on a tied head
    that is the input embedding too (two identical PaCA forwards differed by 30; PiSSA moved the
    embedding by 0.044). Refused before any module is touched."""
    model = lt.load_model("tiny-llama")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lt.LeantuneError, match=r"(paca|lora) writes into the weight of 'lm_head', which "
                                               r"'model.embed_tokens' shares"):
        lt.attach(model, config)
    assert lt.attached(model) == {} and isinstance(model.lm_head, torch.nn.Linear)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    lt.attach(model, lt.PaCA(r=4, targets=["q_proj"]))  # the same model takes it on other targets
