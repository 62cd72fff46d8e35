import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leantune.cli import build_parser, main
from leantune.errors import LeantuneError
from leantune.training.keys import documented_keys
from leantune.training.config import (DataConfig, TrainConfig, build_config, default_document,
                                      load_config, method_dict, resolved_dict)

ROOT = Path(__file__).resolve().parent.parent


def test_every_key_is_documented_and_the_example_lists_them_at_their_defaults():
    rows = documented_keys()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert all(doc for _, _, doc in rows)
    example = yaml.safe_load((ROOT / "configs" / "example.yaml").read_text())
    defaults = TrainConfig().to_dict()
    assert example == defaults
    text = (ROOT / "configs" / "example.yaml").read_text()
    for key in keys:
        assert f"{key.split('.')[-1]}:" in text


def test_help_shows_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["train", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for key, default, _ in documented_keys():
        assert f"  {key} = " in out
    assert "lr = 0.0002" in out and "--resume" in out and "--overwrite" in out


def test_help_and_the_example_state_which_keys_a_resume_may_change(capsys):
    from leantune.training.config import RESUMABLE_KEYS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    rule = " ".join(capsys.readouterr().out.split("--resume may change only ", 1)[1].split())
    example = (ROOT / "configs" / "example.yaml").read_text()
    paragraph = " ".join(example.split("# Resuming", 1)[1].split("\n\n", 1)[0].replace("#", " ").split())
    for text in (rule, paragraph):
        listed = text.split(":", 1)[0]
        assert all(key in listed for key in RESUMABLE_KEYS), listed
        assert "refused" in text and "--overwrite" in text


def test_embedded_default_is_valid_and_picks_a_registered_method():
    config = load_config()
    assert config.model == "smollm2-135m" and config.data.train == "humaneval-tests:train"
    from leantune.methods import METHODS

    expected = "paca" if "paca" in METHODS else "lora"
    assert method_dict(config)["name"] == expected
    assert resolved_dict(config)["method"]["name"] == expected
    assert default_document()["unit_test_table"] is True


def test_overrides_with_dotted_keys_and_yaml_values():
    config = build_config({"method": {"name": "lora", "r": 4, "alpha": 8}},
                          ["method.r=16", "data.eval=null", "lr=1e-4", "max_steps=7", "packing=true",
                           "data.train=some.jsonl", "chunked_loss=false"])
    assert config.method == {"name": "lora", "r": 16, "alpha": 8}
    assert config.data == DataConfig(train="some.jsonl", eval=None)
    assert config.lr == 1e-4 and config.max_steps == 7 and config.packing is True and config.chunked_loss is False


def test_changing_the_method_name_keeps_the_keys_the_new_method_takes(capsys):
    config = build_config({"method": {"name": "lora", "r": 4, "dropout": 0.1}}, ["method.name=lora"])
    assert config.method == {"name": "lora", "r": 4, "dropout": 0.1}
    config = build_config({}, ["method.r=4"])  # parameters on top of the auto-chosen method
    assert config.method == {"name": "auto", "r": 4}
    assert method_dict(config)["r"] == 4 and method_dict(config)["name"] in ("paca", "lora")
    assert capsys.readouterr().err == ""
    config = build_config({"method": {"name": "lora", "r": 4, "dropout": 0.1}}, ["method.name=auto"])
    assert config.method == {"name": "auto", "r": 4}  # PaCA takes r, not dropout
    assert capsys.readouterr().err == "--set method.name=auto: dropped method keys dropout, which auto does not take (kept r)\n"


def test_switching_a_yaml_lora_block_to_ia3_names_the_dropped_keys(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-llama\nmethod: {name: lora, r: 8, alpha: 16, dropout: 0.05, targets: [q_proj, v_proj]}\n")
    config = load_config(str(path), ["method.name=ia3"])
    assert config.method == {"name": "ia3", "targets": ["q_proj", "v_proj"]}  # targets applies to IA3 too
    err = capsys.readouterr().err
    assert err == "--set method.name=ia3: dropped method keys r, alpha, dropout, which ia3 does not take (kept targets)\n"
    config = load_config(str(path), ["method.name=dora"])  # DoRA takes every LoRA key
    assert config.method == {"name": "dora", "r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
    assert capsys.readouterr().err == ""


def test_yaml_file_loading(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-llama\nmethod: {name: lora, r: 2}\ndata: {train: x.jsonl}\nlr: 1e-3\n")
    config = load_config(str(path), ["batch_size=2"])
    assert config.model == "tiny-llama" and config.lr == 1e-3 and config.batch_size == 2
    assert config.data.eval == "humaneval-tests:test"  # unspecified keys keep their defaults


@pytest.mark.parametrize("document, overrides, message", [
    ({"lrr": 1}, [], r"unknown config key 'lrr' \(did you mean 'lr'\?\)"),
    ({"data": {"trian": "x"}}, [], r"unknown config key 'data.trian' \(did you mean 'data.train'\?\)"),
    ({}, ["batch_size=0"], r"config key 'batch_size' must be an integer >= 1, got 0"),
    ({}, ["batch_size=four"], r"config key 'batch_size' must be an integer >= 1, got 'four'"),
    ({}, ["lr=-1"], r"config key 'lr' must be a number > 0"),
    ({}, ["schedule=step"], r"config key 'schedule' must be one of constant, linear, cosine"),
    ({}, ["precision=fp8"], r"config key 'precision' must be one of fp32, bf16, fp16"),
    ({}, ["overlong=cut"], r"config key 'overlong' must be one of truncate, drop"),
    ({}, ["warmup=2.5"], r"config key 'warmup' must be a whole number of steps"),
    ({}, ["packing=maybe"], r"config key 'packing' must be true or false"),
    ({}, ["data.train=null"], r"config key 'data.train' must be a file path"),
    ({}, ["max_grad_norm=0"], r"config key 'max_grad_norm' must be a number > 0 or null"),
    ({}, ["adam_betas=[0.9]"], r"config key 'adam_betas' must be two numbers"),
    ({}, ["method=lora"], r"config key 'method' must be 'auto' or a mapping with a name"),
    ({}, ["method.name=lorra"], r"config key 'method': unknown method 'lorra' \(did you mean lora"),
    ({}, ["method.name=lora", "method.r=0"], r"config key 'method': lora: 'r' must be an integer >= 1"),
    ({}, ["method.name=lora", "method.rank=4"], r"config key 'method': lora: unknown key 'rank'"),
    ({}, ["epochs=0"], r"config key 'epochs' must be a number > 0"),
    ({}, ["nonsense"], r"--set expects key=value, got 'nonsense'"),
    ({}, ["lr.x=1"], r"config key 'lr' is not a mapping"),
])
def test_bad_keys_and_values_name_the_key(document, overrides, message):
    with pytest.raises(LeantuneError, match=message):
        build_config(document, overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(LeantuneError, match="config file '.*missing.yaml' does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: tiny-llama\nmethod: {name: lora\nlr: 1\n")
    with pytest.raises(LeantuneError, match=r"broken.yaml', line \d+: not valid YAML"):
        load_config(str(broken))
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(LeantuneError, match="must be a mapping"):
        load_config(str(listing))


def test_cli_bad_value_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status = main(["train", "--set", "model=tiny-llama", "--set", "batch_size=-3"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().count("\n") == 0 and "config key 'batch_size'" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_subprocess_bad_key_is_one_line_exit_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: tiny-llama\nbatch_sise: 2\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "leantune.cli", "train", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("leantune train: error: unknown config key 'batch_sise' (did you mean "
                                   "'batch_size'?); see leantune train --help for all keys")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_dataclass_fields_all_carry_docs():
    for cls in (TrainConfig, DataConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f.name


def test_cli_bad_data_line_exits_2_naming_file_and_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b",}\n')
    status = main(["train", "--set", "model=tiny-llama", "--set", "data.train=data.jsonl", "--set", "data.eval=null",
                   "--set", "out_dir=out"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.strip() == "leantune train: error: data.jsonl, line 2: not valid JSON (Expecting property name enclosed in double quotes at column 35)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
