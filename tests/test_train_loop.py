import copy
import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml

import leantune as lt
from helpers import IGNORE, byte_ids, chatml_example, pair_example
from leantune.data import builtin_records
from leantune.errors import LeantuneError
from leantune.files import load_tensors
from leantune.training.loop import TrainingDiverged
from leantune.training.optim import lr_factor, parameter_groups, warmup_steps


def write_pairs(path, count=24, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            handle.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    return str(path)


def tiny_config(tmp_path, **overrides):
    config = {
        "model": "tiny-llama",
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "data": {"train": write_pairs(tmp_path / "train.jsonl"), "eval": write_pairs(tmp_path / "eval.jsonl", 8, seed=1)},
        "max_length": 64, "batch_size": 4, "max_steps": 4, "lr": 1e-2, "warmup": 0,
        "save_every": 0, "out_dir": str(tmp_path / "out"), "progress": False, "seed": 0,
        "threads": 1,  # tiny matrices: a second thread only adds synchronisation
    }
    for key, value in overrides.items():
        if key.startswith("data_"):
            config["data"][key[5:]] = value
        else:
            config[key] = value
    return config


def write_mixed_pairs(path, count=24):
    """Pairs where every third prompt is empty: those examples carry loss from their first token on,
    which packing must not predict from the end of the example before it."""
    records = [json.loads(line) for line in open(write_pairs(path, count))]
    for record in records[::3]:
        record["prompt"] = ""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def adapter_tensors(out_dir):
    return load_tensors(out_dir / "adapter" / "adapter.safetensors")


def test_training_lowers_the_loss_and_writes_adapter_config_metrics_summary(tmp_path):
    result = lt.train(tiny_config(tmp_path, max_steps=12))
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens"] > 0 and summary["peak_memory_bytes"] > 0
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 and math.isfinite(r["grad_norm"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [r["eval_loss"] for r in records if "eval_loss" in r] == [summary["eval_loss_before"], summary["eval_loss_after"]]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == {"name": "lora", "r": 4, "alpha": 8} and saved["max_steps"] == 12

    # the saved adapter reproduces the trained model
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    result.model.eval()
    expected = result.model(tokens).logits
    reloaded = lt.load_adapter(lt.load_model("tiny-llama"), out / "adapter")
    torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=0, atol=0)


def test_checkpoints_hold_adapter_optimizer_rng_and_position_and_keep_the_last_k(tmp_path):
    lt.train(tiny_config(tmp_path, max_steps=7, save_every=2, keep_checkpoints=2, data_eval=None))
    root = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-6", "step-7"]  # the end is saved too
    assert (root / "latest").read_text().strip() == "step-7"
    final = load_tensors(root / "step-7" / "adapter" / "adapter.safetensors")
    assert all(torch.equal(v, adapter_tensors(tmp_path / "out")[k]) for k, v in final.items())
    step = root / "step-6"
    assert sorted(p.name for p in step.iterdir()) == ["adapter", "optimizer.json", "optimizer.safetensors",
                                                      "rng.safetensors", "trainer_state.json"]
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["position"] == 6 and state["schedule"]["total_steps"] == 7
    assert set(state["rng"]) == {"python", "numpy"}
    optimizer = load_tensors(step / "optimizer.safetensors")
    adapter = load_tensors(step / "adapter" / "adapter.safetensors")
    assert len(adapter) == 2 * 7 * 2
    assert {k.split(".", 1)[1] for k in optimizer} == {"step", "exp_avg", "exp_avg_sq"}
    assert len(optimizer) == 3 * len(adapter)
    assert all(float(v) == 6 for k, v in optimizer.items() if k.endswith(".step"))
    groups = json.loads((step / "optimizer.json").read_text())["param_groups"]
    assert sum(len(g["names"]) for g in groups) == len(adapter)
    assert load_tensors(step / "rng.safetensors")["torch_cpu"].dtype == torch.uint8
    # safetensors + JSON only
    assert not [p for p in (tmp_path / "out").rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pickle")]


def test_gradient_accumulation_equals_one_bigger_batch(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = lt.train(tiny_config(tmp_path / "a", max_steps=2, batch_size=4, grad_accum=1, group_by_length=False, data_eval=None))
    two = lt.train(tiny_config(tmp_path / "b", max_steps=2, batch_size=2, grad_accum=2, group_by_length=False, data_eval=None))
    assert one.summary["tokens"] == two.summary["tokens"]
    for key, value in adapter_tensors(tmp_path / "a" / "out").items():
        torch.testing.assert_close(adapter_tensors(tmp_path / "b" / "out")[key], value, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    calls = []
    for folder, checkpointing in (("a", False), ("b", True)):
        model = lt.load_model("tiny-llama")
        count = [0]
        # forwards that build a graph: the loss's one-off check of the output head runs without
        model.model.layers[0].self_attn.register_forward_pre_hook(
            lambda *_: count.__setitem__(0, count[0] + torch.is_grad_enabled()))
        lt.train(tiny_config(tmp_path / folder, max_steps=2, data_eval=None, gradient_checkpointing=checkpointing),
                 model=model)
        calls.append(count[0])
    assert calls == [2, 4]  # the checkpointed run recomputes each layer in backward
    for key, value in adapter_tensors(tmp_path / "a" / "out").items():
        torch.testing.assert_close(adapter_tensors(tmp_path / "b" / "out")[key], value, rtol=1e-5, atol=1e-7)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import leantune.training.loop as loop_module

    calls = {"n": 0}
    original = loop_module.causal_lm_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(loop_module, "causal_lm_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at step 5; training stopped without saving, "
                                               r"the last good checkpoint is .*step-4"):
        lt.train(tiny_config(tmp_path, max_steps=10, save_every=2, data_eval=None))
    out = tmp_path / "out"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())["step"] == 4
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    assert all(torch.isfinite(t).all() for t in load_tensors(out / "checkpoints" / "step-4" / "adapter" / "adapter.safetensors").values())


def test_a_non_empty_out_dir_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = tiny_config(tmp_path, max_steps=1, data_eval=None)
    with pytest.raises(LeantuneError, match="out_dir '.*out' is not empty; pass --resume .* or --overwrite"):
        lt.train(config)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(LeantuneError, match="contradict"):
        lt.train(config, resume=True, overwrite=True)
    lt.train(config, overwrite=True)
    assert (out / "adapter").is_dir() and (out / "notes.txt").read_text() == "mine"
    lt.train(config, overwrite=True)  # replacing an earlier run


@pytest.mark.parametrize("method", [
    {"name": "prefix", "num_virtual_tokens": 4, "reparam_hidden": 8},
    {"name": "hybrid", "parts": [{"name": "prefix", "num_virtual_tokens": 4, "reparam_hidden": 8},
                                 {"name": "lora", "r": 2, "targets": ["down_proj"]}]},
], ids=["prefix", "hybrid-with-prefix"])
def test_a_reparameterised_prefix_run_resumes_exactly(tmp_path, method):
    """Its adapter is saved folded (the prefixes the MLP makes); the checkpoint keeps the MLP itself."""
    lt.train(tiny_config(tmp_path, max_steps=4, save_every=2, data_eval=None, method=method))
    expected = adapter_tensors(tmp_path / "out")
    # back to step 2, as if the run had stopped there
    checkpoints = tmp_path / "out" / "checkpoints"
    assert (checkpoints / "step-2" / "training_state.safetensors").is_file()
    shutil.rmtree(checkpoints / "step-4")
    shutil.rmtree(tmp_path / "out" / "adapter")
    (tmp_path / "out" / "summary.json").unlink()
    (checkpoints / "latest").write_text("step-2\n")
    lt.train(tiny_config(tmp_path, max_steps=4, save_every=2, data_eval=None, method=method), resume=True)
    resumed = adapter_tensors(tmp_path / "out")
    assert set(resumed) == set(expected) and all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_an_out_dir_under_a_file_is_named_in_one_sentence(tmp_path):
    (tmp_path / "afile").write_text("mine")
    config = tiny_config(tmp_path, max_steps=1, data_eval=None, out_dir=str(tmp_path / "afile" / "sub"))
    with pytest.raises(LeantuneError, match="out_dir '.*sub' lies under '.*afile', which is a file"):
        lt.train(config)
    assert (tmp_path / "afile").read_text() == "mine"


def test_resume_of_a_finished_run_does_nothing(tmp_path, capsys):
    config = tiny_config(tmp_path, max_steps=2, data_eval=None)
    lt.train(config)
    before = adapter_tensors(tmp_path / "out")
    result = lt.train(config, resume=True)
    assert "already finished" in capsys.readouterr().err and result.steps == 2
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(tmp_path / "out").items())


def test_resume_of_a_run_that_finished_short_without_a_checkpoint_is_refused_and_keeps_it(tmp_path):
    lt.train(tiny_config(tmp_path, max_steps=2, save_every=0, data_eval=None))
    before = adapter_tensors(tmp_path / "out")
    with pytest.raises(LeantuneError, match=r"--resume: the run in '.*out' finished at step 2 and kept no checkpoint"):
        lt.train(tiny_config(tmp_path, max_steps=4, save_every=0, data_eval=None), resume=True)
    assert all(torch.equal(before[k], v) for k, v in adapter_tensors(tmp_path / "out").items())


def test_resume_with_more_steps_continues_from_the_end(tmp_path, capsys):
    lt.train(tiny_config(tmp_path, max_steps=3, save_every=2, data_eval=None))
    result = lt.train(tiny_config(tmp_path, max_steps=5, save_every=2, data_eval=None), resume=True)
    assert "step-3 (step 3)" in capsys.readouterr().err and result.steps == 5
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_refuses_a_different_run_identity(tmp_path):
    lt.train(tiny_config(tmp_path, max_steps=2, save_every=1, data_eval=None))
    with pytest.raises(LeantuneError, match="config key 'batch_size' is 2 but the run .* used 4"):
        lt.train(tiny_config(tmp_path, max_steps=2, batch_size=2, data_eval=None), resume=True)


def test_time_placeholder_out_dir(tmp_path):
    result = lt.train(tiny_config(tmp_path, max_steps=1, data_eval=None, out_dir=str(tmp_path / "runs" / "r-{time}")))
    assert result.out_dir.parent == tmp_path / "runs" and result.out_dir.name.startswith("r-2")


def hand_rows(kind, tmp_path, tokenizer):
    """(data file, rows) for one data kind: the file the trainer reads and the token ids and labels
    it should turn into, both written out by hand (rows are the sequences of one batch)."""
    eos = tokenizer.eos_token_id
    if kind in ("pairs", "packing"):  # packed examples see only themselves: the same loss as unpacked
        path = write_mixed_pairs(tmp_path / "hand.jsonl")  # not train.jsonl: tiny_config writes that one
        records = [json.loads(line) for line in open(path)]
        rows = [pair_example(r["prompt"], r["completion"], eos) for r in records]
        return path, rows
    if kind == "chat":
        path = tmp_path / "chat.jsonl"
        conversations = [[{"role": "user", "content": f"count to {i}"},
                          {"role": "assistant", "content": " ".join(map(str, range(i)))}] for i in range(2, 10)]
        path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
        im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        return str(path), [chatml_example(m, im_start, im_end) for m in conversations]
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 30)
    ids = byte_ids(path.read_text())
    return str(path), [(ids[i:i + 64], ids[i:i + 64]) for i in range(0, len(ids), 64) if len(ids[i:i + 64]) > 1]


def hand_loss(model, rows):
    """Mean next-token cross-entropy over the labelled tokens of `rows`, one sequence at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            targets = torch.tensor(labels[1:])
            keep = targets != IGNORE
            total += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count, count


@pytest.mark.parametrize("kind", ["pairs", "chat", "text", "packing"])
def test_first_step_loss_equals_a_hand_computed_loss(tmp_path, kind):
    """One batch holds the whole data set, so the first step's loss is the mean over all its labelled
    tokens (LoRA's B starts at zero: the model is still the base model then)."""
    tokenizer = lt.load_tokenizer("tiny-llama")
    path, rows = hand_rows(kind, tmp_path, tokenizer)
    result = lt.train(tiny_config(tmp_path, max_steps=1, batch_size=64, data_train=path, data_eval=None,
                                  packing=kind == "packing"))
    expected, count = hand_loss(lt.load_model("tiny-llama"), rows)
    (step,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert step["loss"] == pytest.approx(expected, rel=1e-5, abs=0)
    assert result.summary["loss_tokens"] == count
    assert result.summary["tokens"] == sum(len(ids) for ids, _ in rows)
    assert result.summary["final_loss"] == step["loss"]


def per_token_losses(model, ids, labels):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    return F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=IGNORE, reduction="none")


def test_packing_keeps_every_target_and_every_example_scores_as_if_alone(tmp_path):
    """Packed rows carry exactly the unpacked examples' targets, and with the positions packing
    gives them, each packed example's per-token losses equal its losses alone: no example of a
    row sees the ones before it."""
    from leantune.data import prepare_dataset

    tokenizer = lt.load_tokenizer("tiny-llama")
    path = write_mixed_pairs(tmp_path / "train.jsonl")
    alone, _ = prepare_dataset(path, tokenizer, 64)
    packed, _ = prepare_dataset(path, tokenizer, 64, packing=True)
    targets = lambda examples: sorted(t for e in examples for t in e.labels[1:] if t != IGNORE)
    assert targets(packed) == targets(alone) and len(packed) < len(alone)
    starts, width = [], 0  # the greedy packing by hand: where each row begins
    for i, example in enumerate(alone):
        if i == 0 or width + len(example) > 64:
            starts.append(i)
            width = 0
        width += len(example)
    assert len(starts) == len(packed)
    model = lt.load_model("tiny-llama")
    for row, begin, end in zip(packed, starts, [*starts[1:], len(alone)]):
        assert row.input_ids == [t for e in alone[begin:end] for t in e.input_ids]
        assert row.position_ids == [p for e in alone[begin:end] for p in range(len(e))]
        with torch.no_grad():
            logits = model(torch.tensor([row.input_ids]), position_ids=torch.tensor([row.position_ids]),
                           use_cache=False).logits[0]  # transformers reads packing only without a cache
        offset = 0
        for example in alone[begin:end]:
            got = F.cross_entropy(logits[offset:offset + len(example) - 1].double(),
                                  torch.tensor(example.labels[1:]), ignore_index=IGNORE, reduction="none")
            torch.testing.assert_close(got, per_token_losses(model, example.input_ids, example.labels),
                                       rtol=1e-5, atol=1e-6)
            offset += len(example)


def test_bf16_autocast_training_follows_float32_within_bf16_precision(tmp_path):
    """Each step's loss under bf16 autocast is the float32 run's within bf16 rounding (8 significant
    bits: relative spacing 2^-8, so 2e-3 is half an ulp). One update moves the next loss by about 1%
    here, so a bf16 step that updated nothing, or updated wrongly, falls outside."""
    runs = {}
    for precision in ("fp32", "bf16"):
        (tmp_path / precision).mkdir()
        lt.train(tiny_config(tmp_path / precision, max_steps=3, precision=precision, data_eval=None,
                             group_by_length=False))
        lines = (tmp_path / precision / "out" / "metrics.jsonl").read_text().splitlines()
        runs[precision] = [json.loads(line) for line in lines]
    assert [r["step"] for r in runs["bf16"]] == [r["step"] for r in runs["fp32"]] == [1, 2, 3]
    for low, full in zip(runs["bf16"], runs["fp32"]):
        assert low["loss"] == pytest.approx(full["loss"], rel=2e-3, abs=0)
        assert low["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-2, abs=0)
    assert [r["loss"] for r in runs["bf16"]] != [r["loss"] for r in runs["fp32"]]  # autocast did run in bf16
    adapter = adapter_tensors(tmp_path / "bf16" / "out")
    assert adapter and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in adapter.values())


def test_parameter_groups_skip_decay_on_biases_norms_and_vectors():
    model = lt.load_model("tiny-qwen2")
    for name, param in model.named_parameters():
        param.requires_grad_("layers.0" in name)
    groups = parameter_groups(model, weight_decay=0.1)
    decayed, plain = groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"])
    assert any(n.endswith("q_proj.bias") for n in plain["names"]) and any("layernorm" in n for n in plain["names"])
    assert not any("bias" in n or "norm" in n for n in decayed["names"])


def test_schedules_and_warmup():
    assert warmup_steps(0.1, 50) == 5 and warmup_steps(3, 50) == 3
    assert [round(lr_factor(s, 10, 2, "constant"), 4) for s in range(4)] == [0.3333, 0.6667, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0 and lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5) and lr_factor(9, 10, 2, "cosine") > 0
    assert lr_factor(2, 10, 2, "cosine") == 1.0


def test_unit_test_table_runs_after_training_on_the_eval_functions(tmp_path, capsys):
    result = lt.train(tiny_config(tmp_path, max_steps=1, unit_test_table=True, unit_test_limit=2,
                                  unit_test_max_new_tokens=8, data_eval="humaneval-tests:test", max_length=512))
    table = json.loads((tmp_path / "out" / "unit_tests.json").read_text())
    assert table["base"]["n"] == table["tuned"]["n"] == 2
    held_out = [r["task_id"] for r in builtin_records("humaneval-tests:test")[:2]]
    assert [row["task_id"] for row in table["tuned"]["rows"]] == held_out
    assert table["tuned"]["eval_loss"] == result.summary["eval_loss_after"]
    assert "tuned" in capsys.readouterr().out
    assert set(result.summary["unit_tests"]) == {"base", "tuned"}


def test_unit_test_table_on_eval_data_without_reference_solutions_is_refused_before_training(tmp_path):
    config = tiny_config(tmp_path, unit_test_table=True)
    with pytest.raises(lt.LeantuneError, match=r"config key 'unit_test_table' needs functions with reference "
                                               r"solutions, but data.eval is '.*eval.jsonl'; set data.eval to a "
                                               r"humaneval-tests split"):
        lt.train(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8}, {"name": "paca", "r": 4}], ids=["lora", "paca"])
def test_compiled_blocks_train_the_same_adapter_and_compile_once_for_every_layer(tmp_path, method):
    """`compile: true` changes how the blocks compute, not what: the same adapter within float32
    rounding; and the block graphs are shared, so a deeper model compiles no more graphs."""
    from torch._dynamo.utils import counters

    graphs, runs = {}, {}
    for layers, compiled in ((2, False), (2, True), (4, True)):
        torch._dynamo.reset()
        counters.clear()
        folder = tmp_path / f"{layers}-{compiled}"
        folder.mkdir()
        model = lt.load_model("tiny-llama")
        if layers != len(model.model.layers):
            deeper = copy.deepcopy(model.config)
            deeper.num_hidden_layers = layers
            model = type(model)(deeper)
        runs[layers, compiled] = lt.train(tiny_config(folder, method=method, max_steps=3, data_eval=None,
                                                      group_by_length=False, compile=compiled), model=model)
        graphs[layers, compiled] = counters["stats"]["unique_graphs"]
    assert 0 < runs[2, True].summary["compile_s"] < runs[2, True].summary["time_s"]
    assert "compile_s" not in runs[2, False].summary
    assert graphs[2, False] == 0 and 0 < graphs[4, True] == graphs[2, True]
    eager, compiled = (adapter_tensors(tmp_path / f"2-{flag}" / "out") for flag in (False, True))
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-6)
    assert all("_compiled_call_impl" not in block.__dict__ for block in runs[2, True].model.model.layers)


def test_compile_with_distributed_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(LeantuneError, match="^config key 'compile' works without distributed for now; "
                                            "got distributed: ddp"):
        lt.train(tiny_config(tmp_path, compile=True, distributed="ddp"))
    assert not (tmp_path / "out").exists()


def test_epochs_end_where_the_data_ends_when_grad_accum_does_not_divide_them(tmp_path):
    """20 examples in batches of 4 are 5 micro-batches per epoch; with grad_accum 2 each epoch is 3
    steps (2, 2, 1 micro-batches), so epochs: 2 trains exactly 10 micro-batches, every example twice,
    and no step mixes two epochs (before: 5 steps of 2, the third one reaching across the boundary;
    with 2 epochs of 13 micro-batches and grad_accum 3 that spilled into a third epoch)."""
    result = lt.train(tiny_config(tmp_path, max_steps=None, epochs=2, grad_accum=2, data_train=write_pairs(
        tmp_path / "twenty.jsonl", 20), data_eval=None, group_by_length=False))
    assert result.summary["steps"] == 6 and result.summary["epochs"] == 2.0
    tokens = sum(len(e.input_ids) for e in lt.data.prepare_dataset(str(tmp_path / "twenty.jsonl"),
                                                                    lt.load_tokenizer("tiny-llama"), 64)[0])
    assert result.summary["tokens"] == 2 * tokens


def test_a_fractional_epoch_ends_at_its_last_micro_batch():
    """1.5 epochs of 5 micro-batches with grad_accum 2 is 8 micro-batches (round(7.5)): 3 steps in the
    first epoch (2, 2, 1), then 2 steps (2, 1); the run stops there, not a whole step later."""
    from leantune.data import BatchStream, Example

    stream = BatchStream([Example([i, i + 1], [i, i + 1]) for i in range(20)], batch_size=4, seed=0, pad_id=0)
    position, sizes = 0, []
    for _ in range(stream.steps_for(1.5, 2)):
        batches = stream.step_batches(position, 2, epochs=1.5)
        sizes.append(len(batches))
        position += len(batches)
    assert sizes == [2, 2, 1, 2, 1] and position == 8


@pytest.mark.parametrize("method", [{"name": "prefix", "num_virtual_tokens": 2},
                                    {"name": "hybrid", "parts": [{"name": "prefix", "num_virtual_tokens": 2},
                                                                 {"name": "adapter", "placement": "parallel"}]}])
def test_prefix_tuning_with_gradient_checkpointing_is_refused_before_an_earlier_run_is_cleared(tmp_path, method):
    lt.train(tiny_config(tmp_path, max_steps=1, data_eval=None))
    kept = adapter_tensors(tmp_path / "out")
    with pytest.raises(LeantuneError, match="^config key 'gradient_checkpointing': prefix tuning cannot train"):
        lt.train(tiny_config(tmp_path, max_steps=1, data_eval=None, method=method, gradient_checkpointing=True),
                 overwrite=True)
    assert all(torch.equal(kept[k], v) for k, v in adapter_tensors(tmp_path / "out").items())


def test_resume_on_rewritten_training_data_is_refused(tmp_path):
    lt.train(tiny_config(tmp_path, max_steps=2, save_every=1, data_eval=None))
    longer = tiny_config(tmp_path, max_steps=4, save_every=1, data_eval=None)
    data = tmp_path / "train.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[: len(lines) // 2]) + "\n")  # the same path, other examples
    with pytest.raises(LeantuneError, match=r"--resume: the training examples differ from those the run in"):
        lt.train(longer, resume=True)
    lt.train(tiny_config(tmp_path, max_steps=4, save_every=1, data_eval=None), resume=True)  # the same data again
