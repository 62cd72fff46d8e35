"""How close the demo job comes to this machine's float32 matmul rate.

    python benchmarks/close_to_limit.py --out benchmarks/results/DATE-cpu-close-to-limit [--set KEY=VALUE ...]

1. The demo job (`leantune train` on the embedded default: PaCA r=16 on SmolLM2-135M, one epoch of
   the humaneval-tests train split, batch 4, max_length 512), in a fresh process, without the
   before/after table; its training time is the summary's `time_s` (steps only, no evaluation).
2. This machine's GEMM rate, measured in this process right before and right after the job, on the
   model's largest linear shape with 2,048 rows (`leantune/bench/bound.py`).
3. The epoch's matmul work: every batch of the job, in the job's order and shapes, run forward and
   backward once more under PyTorch's FLOP counter, attention added (`bound.counted_flops`).

4. Where the rest goes: every k-th batch of the epoch (`--profile-batches`, spread over its
   lengths) run forward and backward once more under torch.profiler, self time grouped by kind of
   work (`leantune/bench/profile.py`), with the rate the linear products and attention reach on
   their counted FLOPs. The profiler adds overhead: read its shares, not its seconds.

Share of the bound = work ÷ training time ÷ GEMM rate (the mean of the two). The benchmark step's
share is `leantune bench`'s "of matmul bound" column. `--set` passes overrides to both the job and
the count (e.g. `--set method.name=lora --set method.r=8`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import leantune as lt
from leantune.bench.bound import attention_flops, attention_gemm_rate, counted_flops, gemm_rate
from leantune.bench.profile import summarize_events
from leantune.data import prepare_dataset
from leantune.data.batching import BatchStream
from leantune.loss import causal_lm_loss, count_loss_tokens
from leantune.training.config import build_method, load_config
from leantune.training.runtime import apply_model_options

GEMM_ROWS = 2048


def run_job(out: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "leantune", "train", "--overwrite", "--set", "unit_test_table=false",
               "--set", f"out_dir={out / 'job'}", *[a for o in overrides for a in ("--set", o)]]
    subprocess.run(command, check=True)
    return json.loads((out / "job" / "summary.json").read_text())


def job_batches(overrides: list[str]):
    """The demo job's config, its model as the job trains it (adapter attached, the config's model
    options applied, train mode), and its batch stream."""
    config = load_config(None, ["unit_test_table=false", *overrides])
    tokenizer = lt.load_tokenizer(config.model)
    model = lt.load_model(config.model)
    lt.attach(model, build_method(config))
    apply_model_options(model, config)  # as the job runs it: fused norms and MLPs, compile if asked
    model.train()
    examples, _ = prepare_dataset(config.data.train, tokenizer, config.max_length, config.overlong, config.packing)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stream = BatchStream(examples, config.batch_size, config.seed, pad, group_by_length=config.group_by_length)
    return config, model, stream


def forward_backward(config, model, batch) -> None:
    """One of the job's steps without the optimizer: its loss, forward and backward."""
    chunked = None if config.chunked_loss == "auto" else bool(config.chunked_loss)
    causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                   chunk_tokens=config.loss_chunk_tokens, chunked=chunked,
                   num_items=count_loss_tokens(batch["labels"])).backward()
    model.zero_grad(set_to_none=True)


def epoch_work(config, model, stream) -> dict:
    """The matmul FLOPs of the job's first epoch, batch by batch, as the counter sees them."""
    flops, tokens = 0.0, 0
    for position in range(stream.batches_per_epoch):
        batch = stream.batch_at(position)
        lengths = batch["attention_mask"].sum(-1).tolist()
        flops += counted_flops(lambda: forward_backward(config, model, batch), model, lengths)
        tokens += int(batch["attention_mask"].sum())
    return {"flops": flops, "tokens": tokens, "batches": stream.batches_per_epoch}


def where_time_goes(config, model, stream, count: int, rate: float) -> dict:
    """Profiled self time by group over `count` of the epoch's batches, and the rates reached."""
    positions = list(range(0, stream.batches_per_epoch, max(1, stream.batches_per_epoch // count)))[:count]
    batches = [stream.batch_at(p) for p in positions]
    forward_backward(config, model, batches[0])  # untimed: first-call costs stay out
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for batch in batches:
            forward_backward(config, model, batch)
    groups = summarize_events(profiler.events())["groups_ms"]
    flops = attention = 0.0
    for batch in batches:
        lengths = batch["attention_mask"].sum(-1).tolist()
        flops += counted_flops(lambda: forward_backward(config, model, batch), model, lengths)
        attention += attention_flops(model, lengths)
    total_s, linear_s = sum(groups.values()) / 1e3, groups["matmul"] / 1e3
    attention_rate = attention_gemm_rate(model, config.max_length)
    return {"batches": positions, "groups_ms": groups, "flops": flops, "attention_flops": attention,
            "linear_flops_per_s": (flops - attention) / linear_s,
            "attention_flops_per_s": attention / (groups["attention"] / 1e3),
            "attention_gemm_flops_per_s": attention_rate,
            "share_of_bound": flops / total_s / rate,
            "share_if_only_linear_products": flops / linear_s / rate,
            # the most any kernel could make of these batches: linear products as they ran, attention
            # at the rate of its bare GEMMs, nothing else taking time
            "share_ceiling": flops / (linear_s + attention / attention_rate) / rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--profile-batches", type=int, default=8, metavar="N",
                        help="batches of the epoch to profile for where the time goes (0: none; default 8)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probe = lt.load_model(load_config(None, args.overrides).model)
    before = gemm_rate(probe, GEMM_ROWS)
    started = time.time()
    summary = run_job(out, args.overrides)
    wall = time.time() - started
    after = gemm_rate(probe, GEMM_ROWS)
    del probe
    config, model, stream = job_batches(args.overrides)
    work = epoch_work(config, model, stream)
    rate = statistics.mean([before, after])
    result = {
        "command": " ".join(["python", *sys.argv]), "threads": torch.get_num_threads(),
        "gemm_flops_per_s_before": before, "gemm_flops_per_s_after": after,
        "train_time_s": summary["time_s"], "job_wall_s": round(wall, 1), "tokens": summary["tokens"],
        "tokens_per_s": summary["tokens_per_s"], "eval_loss_after": summary["eval_loss_after"],
        "epoch_flops": work["flops"], "counted_tokens": work["tokens"],
        "flops_per_token": work["flops"] / work["tokens"],
        "share_of_bound": work["flops"] / summary["time_s"] / rate,
    }
    if args.profile_batches:
        result["profile"] = where_time_goes(config, model, stream, args.profile_batches, rate)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(report(result))
    print(report(result))


def report(r: dict) -> str:
    lines = [
        "# The demo job against this machine's matmul rate", "",
        f"Command: `{r['command']}` ({r['threads']} torch threads)", "",
        "| | |", "|---|---|",
        f"| GEMM rate, largest linear shape x {GEMM_ROWS} rows (before / after the job) | "
        f"{r['gemm_flops_per_s_before'] / 1e9:.0f} / {r['gemm_flops_per_s_after'] / 1e9:.0f} GFLOP/s |",
        f"| training time (steps only) | {r['train_time_s']:.1f} s |",
        f"| tokens, tokens/s | {r['tokens']:,}, {r['tokens_per_s']:,.1f} |",
        f"| matmul work of the epoch (counted) | {r['epoch_flops'] / 1e12:.2f} TFLOP, "
        f"{r['flops_per_token'] / 1e9:.3f} GFLOP per token |",
        f"| **share of the matmul bound** | **{r['share_of_bound']:.0%}** |",
        f"| eval loss after | {r['eval_loss_after']} |", ""]
    return "\n".join(lines + (profile_report(r["profile"]) if "profile" in r else []))


def profile_report(p: dict) -> list[str]:
    total = sum(p["groups_ms"].values())
    lines = [f"## Where the time goes ({len(p['batches'])} of the epoch's batches, forward and backward, "
             "under torch.profiler)", "", "| work | share of the time |", "|---|---|"]
    lines += [f"| {group} | {ms / total:.1%} |" for group, ms in p["groups_ms"].items() if ms]
    lines += ["", f"Linear products run at {p['linear_flops_per_s'] / 1e9:.0f} GFLOP/s on their counted FLOPs, "
              f"attention (SDPA's kernel) at {p['attention_flops_per_s'] / 1e9:.0f} GFLOP/s "
              f"({p['attention_flops'] / p['flops']:.0%} of the FLOPs). Share of the bound over these batches: "
              f"{p['share_of_bound']:.0%}; if nothing but the linear products took time, "
              f"{p['share_if_only_linear_products']:.0%}. Attention's own products, as bare GEMMs of its shapes "
              f"(all heads, max_length tokens, into buffers allocated once), run at "
              f"{p['attention_gemm_flops_per_s'] / 1e9:.0f} GFLOP/s here: with attention at that rate and nothing "
              f"but these products taking time (no softmax, norms, activations or glue), the share would be "
              f"{p['share_ceiling']:.0%}, the most any attention kernel could reach on this machine.", ""]
    return lines


if __name__ == "__main__":
    main()
