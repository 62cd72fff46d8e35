import os
import stat

import pytest
import torch

import leantune as lt
from conftest import TwoLayer, randomize_adapter


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

    monkeypatch.setattr("leantune.io.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lt.save_adapter(plain_module, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp leftovers


def test_saved_files_follow_the_umask_not_private_temp_modes(plain_module, tmp_path):
    from leantune.io import atomic_write_text

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
    with pytest.raises(lt.LeantuneError, match=r"adapter file lacks tensor 'model\.layers\.\d+\..*\.lora_A' "
                                                r"\(\d+ missing\): it was saved for another model or method"):
        lt.load_adapter(tiny_llama, tmp_path / "a")
    assert lt.attached(tiny_llama) == {}


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


def test_disabled_that_cannot_start_leaves_other_adapters_enabled(plain_module):
    lt.attach(plain_module, lt.LoRA(r=2), adapter_name="a")
    randomize_adapter(plain_module)
    lt.attach(plain_module, lt.Full(), adapter_name="b")
    x = torch.randn(3, 16)
    before = plain_module(x)
    with pytest.raises(lt.LeantuneError, match=r"no separate base model to run; attach Full\(keep_base=True\)"):
        with lt.disabled(plain_module):
            pass
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
