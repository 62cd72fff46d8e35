"""The demo job trained three ways, each in a fresh process, on the embedded SmolLM2-135M:

1. the usual stack: `transformers.Trainer` + PEFT LoRA r=8 (α=16, the 7 projections), its own loss
   and defaults otherwise (AdamW, group_by_length), at LoRA's best learning rate from the grid (3e-3);
2. `leantune train` with LoRA r=8 at the same learning rate;
3. `leantune train` with PaCA r=16 at its best learning rate (2e-3).

Same data for all (humaneval-tests train split as leantune tokenizes it: loss on the test only,
max_length 512, truncated), batch 4, one epoch, cosine schedule with 10% warm-up, seed 0. Reported:
training wall-clock, tokens/s, peak RSS of the process, and the held-out eval loss (leantune's
metric for all three: the PEFT adapter is imported into leantune for it).

    python benchmarks/whole_job.py --out benchmarks/results/DATE-cpu-whole-job [--repeats N]

`--precision bf16` runs all three under bfloat16 autocast (the Trainer's `bf16=True`, leantune's
`precision: bf16`): the matmuls in bfloat16, on CPUs with AVX512-BF16 (or AMX) several times the
float32 rate. `--runs` picks some of the three (the stack's row is the reference of the table).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUNS = {
    "hf-trainer-peft-lora": None,
    "leantune-lora": ["--set", "method.name=lora", "--set", "method.r=8", "--set", "method.alpha=16", "--set", "lr=3e-3"],
    "leantune-paca": ["--set", "method.name=paca", "--set", "method.r=16", "--set", "method.alpha=32", "--set", "lr=2e-3"],
}


def usual_stack(out: Path, precision: str = "fp32") -> dict:
    """In this (fresh) process: Trainer + PEFT LoRA on leantune's tokenized examples."""
    import peft
    import torch
    from transformers import Trainer, TrainingArguments

    import leantune as lt
    from leantune.data import prepare_dataset
    from leantune.eval.metrics import loss_and_perplexity

    tokenizer = lt.load_tokenizer("smollm2-135m")
    train, _ = prepare_dataset("humaneval-tests:train", tokenizer, 512)
    held_out, _ = prepare_dataset("humaneval-tests:test", tokenizer, 512)
    pad = tokenizer.pad_token_id

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            return {"input_ids": train[i].input_ids, "labels": train[i].labels}

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    # the model as transformers builds it (torch's own GEMMs), as the stack's users run it
    model = peft.get_peft_model(lt.load_model("smollm2-135m", fast_linears=False),
                                peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=4, learning_rate=3e-3,
                             num_train_epochs=1, lr_scheduler_type="cosine", warmup_steps=0.1, seed=0,
                             train_sampling_strategy="group_by_length", report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=5, disable_tqdm=True, dataloader_num_workers=0, bf16=precision == "bf16")
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = sum(len(e.input_ids) for e in train)
    model.save_pretrained(str(out / "peft-adapter"))
    ours = lt.import_peft(lt.load_model("smollm2-135m"), out / "peft-adapter")
    loss = loss_and_perplexity(ours, held_out, pad)["loss"]
    return {"time_s": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1), "peak_memory_bytes": peak,
            "eval_loss_after": round(loss, 4), "steps": trainer.state.global_step}


def leantune_run(out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "leantune", "train", "--set", "unit_test_table=false", "--set", "progress=false",
               "--set", "schedule=cosine", "--set", "warmup=0.1", "--set", f"out_dir={out}", *extra]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {key: summary[key] for key in ("time_s", "tokens_per_s", "peak_memory_bytes", "eval_loss_after", "steps")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated: " + ", ".join(RUNS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one configuration in this process
    args = parser.parse_args()
    out = Path(args.out)
    if args.one:
        print(json.dumps(usual_stack(out / args.one, args.precision)))
        return
    results = {"command": " ".join(["python"] + sys.argv), "precision": args.precision, "runs": []}
    for repeat in range(args.repeats):  # interleaved: the VM's drift hits every configuration alike
        for name in args.runs.split(","):
            extra = RUNS[name]
            folder = out / f"{name}-{repeat}"
            if extra is None:
                done = subprocess.run([sys.executable, __file__, "--out", str(out), "--one", f"{name}-{repeat}",
                                       "--precision", args.precision], check=True, capture_output=True, text=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
            else:
                row = leantune_run(folder, [*extra, "--set", f"precision={args.precision}"])
            row.update(name=name, repeat=repeat)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    by_name: dict[str, list[dict]] = {}
    for row in results["runs"]:
        by_name.setdefault(row["name"], []).append(row)
    base = by_name["hf-trainer-peft-lora"]
    base_time = sum(r["time_s"] for r in base) / len(base)
    base_peak = sum(r["peak_memory_bytes"] for r in base) / len(base)
    base_loss = sum(r["eval_loss_after"] for r in base) / len(base)
    lines = ["| run | train s | tokens/s | peak RSS MiB | eval loss | time vs stack | memory vs stack | loss vs stack |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in by_name.items():
        t = sum(r["time_s"] for r in rows) / len(rows)
        p = sum(r["peak_memory_bytes"] for r in rows) / len(rows)
        loss = sum(r["eval_loss_after"] for r in rows) / len(rows)
        tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
        lines.append(f"| {name} | {t:.0f} | {tps:,.0f} | {p / 2**20:,.0f} | {loss:.4f} | {t / base_time:.2f}x | "
                     f"{p / base_peak:.2f}x | {loss / base_loss - 1:+.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
