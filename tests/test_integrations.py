"""leantune under the real `transformers.Trainer` and TRL `SFTTrainer`: training, saving, resuming."""
from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import leantune as lt
from conftest import randomize_adapter
from helpers import CALIB_TEXT, sketch_config
from leantune.integrations import ADAPTER_DIR, LeantuneCallback, LeantuneSFTTrainer, LeantuneTrainer

TEXTS = [f"def add_{i}(a, b):\n    return a + b * {i}\n" for i in range(8)]


def dataset(tokenizer, texts=TEXTS):
    rows = [tokenizer(text)["input_ids"][:48] for text in texts]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def arguments(tmp_path, **changes):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=6,
                  logging_steps=1, save_steps=3, report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, dataloader_num_workers=0, disable_tqdm=True)
    values.update(changes)
    return TrainingArguments(**values)


def collate(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), 0, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(feature["input_ids"]), torch.tensor(feature["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


CONFIGS = {
    "lora": lambda tmp: lt.LoRA(r=4, alpha=8),
    "dora": lambda tmp: lt.DoRA(r=4, alpha=8),
    "paca": lambda tmp: lt.PaCA(r=4, alpha=8),
    "ia3": lambda tmp: lt.IA3(),
    "prompt": lambda tmp: lt.PromptTuning(num_virtual_tokens=4),
    "sketchtune": lambda tmp: sketch_config(_calib(tmp)),
}


def _calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(CALIB_TEXT)
    return str(path)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_learns_under_the_trainer_and_its_saved_adapter_reloads_to_the_same_logits(tmp_path, method):
    tokenizer = lt.load_tokenizer("tiny-llama")
    model = lt.attach(lt.load_model("tiny-llama"), CONFIGS[method](tmp_path))
    trainer = Trainer(model=model, args=arguments(tmp_path / "run", gradient_accumulation_steps=2, max_grad_norm=1.0),
                      train_dataset=dataset(tokenizer), data_collator=collate, callbacks=[LeantuneCallback()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0], losses
    assert (tmp_path / "run" / "checkpoint-3" / ADAPTER_DIR / "adapter.safetensors").is_file()
    fresh = lt.load_adapter(lt.load_model("tiny-llama"), tmp_path / "run" / ADAPTER_DIR).eval()
    probe = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fresh(probe).logits, model.eval()(probe).logits, atol=1e-5, rtol=1e-5)


def _one_step(model, batch, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("method", ["paca", "sketchtune", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_a_trainer_step_equals_a_plain_adamw_step(tmp_path, method, checkpointing):
    """PaCA's columns and SketchTune's tables move exactly as under a hand-written AdamW step,
    also when the Trainer recomputes the decoder blocks (gradient checkpointing)."""
    tokenizer = lt.load_tokenizer("tiny-llama")
    data = dataset(tokenizer, TEXTS[:2])
    batch = collate([data[0], data[1]])
    models = []
    for _ in range(2):
        torch.manual_seed(0)  # LoRA's A starts random
        model = lt.attach(lt.load_model("tiny-llama"), CONFIGS[method](tmp_path))
        randomize_adapter(model, scale=0.05)
        models.append(model)
    trained, reference = models
    args = arguments(tmp_path / "run", max_steps=1, save_steps=100, max_grad_norm=0.0, optim="adamw_torch",
                     activation_checkpointing=checkpointing)
    Trainer(model=trained, args=args, train_dataset=data, data_collator=collate).train()
    _one_step(reference, batch)
    for (name, got), expected in zip(trained.named_parameters(), reference.parameters()):
        if expected.requires_grad:
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=name)
    probe = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(trained.eval()(probe).logits, reference.eval()(probe).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [lt.PaCA(r=4, alpha=8), lt.PrefixTuning(num_virtual_tokens=4, reparam_hidden=8)],
                         ids=["paca", "prefix-reparam"])  # the second saves its adapter folded
def test_save_model_writes_the_adapter_only_and_a_resumed_trainer_equals_an_uninterrupted_one(tmp_path, method):
    tokenizer = lt.load_tokenizer("tiny-llama")
    data = dataset(tokenizer)

    def trainer(folder, max_steps):
        model = lt.attach(lt.load_model("tiny-llama"), copy.deepcopy(method))
        return LeantuneTrainer(model=model, args=arguments(folder, max_steps=max_steps, save_steps=2),
                               train_dataset=data, data_collator=collate, processing_class=tokenizer)

    whole = trainer(tmp_path / "whole", 4)
    whole.train()
    whole.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / ADAPTER_DIR / "adapter.safetensors").is_file()
    assert not list((tmp_path / "final").glob("model*.safetensors"))
    assert not list((tmp_path / "whole" / "checkpoint-2").glob("model*.safetensors"))

    first = trainer(tmp_path / "split", 2)
    first.train()
    resumed = trainer(tmp_path / "split", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    for got, expected in zip(resumed.model.parameters(), whole.model.parameters()):
        if expected.requires_grad:
            torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_trl_sft_trainer_with_a_completion_only_loss(tmp_path):
    from trl import SFTConfig  # TRL is a test dependency here

    tokenizer = lt.load_tokenizer("tiny-llama")
    data = Dataset.from_dict({"prompt": [f"# add {i}\n" for i in range(8)],
                              "completion": [f"def add(a):\n    return a + {i}\n" for i in range(8)]})
    model = lt.attach(lt.load_model("tiny-llama"), lt.PaCA(r=4, alpha=8))
    config = SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                       logging_steps=1, save_steps=3, report_to=[], use_cpu=True, completion_only_loss=True,
                       max_length=64, disable_tqdm=True, lr_scheduler_type="constant")
    trainer = LeantuneSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert (tmp_path / "checkpoint-3" / ADAPTER_DIR / "adapter.safetensors").is_file()
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompts carry no loss


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_trl_packing_is_checked_to_keep_examples_apart(tmp_path, method):
    """TRL packs with restarting position ids and no mask. LoRA trains that way; prompt tuning would
    put its virtual tokens before a packed row's first example only: refused in one sentence."""
    from trl import SFTConfig  # TRL is a test dependency here

    tokenizer = lt.load_tokenizer("tiny-llama")
    data = Dataset.from_dict({"prompt": [f"# add {i}\n" for i in range(8)],
                              "completion": [f"def add(a):\n    return a + {i}\n" for i in range(8)]})
    config = lt.LoRA(r=4, alpha=8) if method == "lora" else lt.PromptTuning(num_virtual_tokens=3)
    model = lt.attach(lt.load_model("tiny-llama"), config)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     report_to=[], use_cpu=True, packing=True, max_length=64, disable_tqdm=True, save_strategy="no")
    if method == "prompt":
        with pytest.raises(lt.LeantuneError, match="SFTConfig's packing / padding_free: .*a packed example does not "
                                                   "compute as it does alone.*pass packing=False"):
            LeantuneSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        return
    trainer = LeantuneSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and (batch["position_ids"][:, 1:] == 0).any()  # packed: positions restart
    trainer.train()
