"""One process against two (DDP, FSDP2) on the embedded SmolLM2-135M: step time and memory per process.

Each configuration is `leantune train` in fresh processes (`--nproc 2` for the distributed ones),
one after the other, on the same global batch (batch_size 4 x max_length 256, humaneval-tests train
split), LoRA r=8 on the 7 projections, fp32, chunked loss, no eval. Reported per configuration:
the median step time after the first step, and per process the peak RSS and the bytes of model
and optimizer tensors it holds (its shards under FSDP2). `--threads` is torch's CPU threads per
process; on a machine with as many cores as processes x threads the comparison shows the
communication overhead, not a speed-up.

    python benchmarks/distributed_train.py --out benchmarks/results/DATE-cpu-distributed [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROWS = {"1 process": ("none", None), "DDP, 2 processes": ("ddp", 2), "FSDP2, 2 processes": ("fsdp", 2)}


def run_row(out: Path, name: str, mode: str, nproc: int | None, args: argparse.Namespace) -> dict:
    folder = out / name.replace(",", "").replace(" ", "-")
    config = {"model": "smollm2-135m", "method": {"name": "lora", "r": 8, "alpha": 16, "targets": "all-linear"},
              "data": {"train": "humaneval-tests:train", "eval": None}, "max_length": 256, "overlong": "truncate",
              "batch_size": 4, "max_steps": args.steps, "save_every": 0, "lr": 1e-3, "seed": 0,
              "threads": args.threads * (2 if nproc is None else 1), "progress": False, "chunked_loss": True,
              "distributed": mode, "out_dir": str(folder / "run")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "leantune.cli", "train", str(folder / "config.yaml"), "--overwrite"]
    command += ["--nproc", str(nproc)] if nproc else []
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    (folder / "stderr.txt").write_text(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed; see {folder / 'stderr.txt'}")
    shutil.rmtree(folder / "run" / "adapter")  # the numbers are the result; the trained adapter is not kept
    summary = json.loads((folder / "run" / "summary.json").read_text())
    steps = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["step_s"] for r in steps if "step_s" in r][1:]
    mib = 2 ** 20
    return {"name": name, "command": " ".join(command[1:]), "step_s": statistics.median(step_s),
            "peak_mib": [v / mib for v in summary.get("peak_memory_bytes_per_process", [summary["peak_memory_bytes"]])],
            "model_mib": [v / mib for v in summary.get("model_bytes_per_process", [])],
            "optimizer_mib": [v / mib for v in summary.get("optimizer_bytes_per_process", [])],
            "final_loss": summary["final_loss"]}


def table(rows: list[dict]) -> str:
    def per(values: list[float]) -> str:
        return " / ".join(f"{v:,.0f}" for v in values) if values else "-"

    base = rows[0]["step_s"]
    lines = ["| configuration | step (s) | vs 1 process | peak RSS per process (MiB) | model tensors per process "
             "(MiB) | optimizer state per process (MiB) | loss at the last step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['step_s']:.2f} | {r['step_s'] / base:.2f}x | {per(r['peak_mib'])} | "
                     f"{per(r['model_mib'])} | {per(r['optimizer_mib'])} | {r['final_loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process of the 2-process rows")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_row(args.out, name, mode, nproc, args) for name, (mode, nproc) in ROWS.items()]
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    (args.out / "results.md").write_text(f"`python benchmarks/distributed_train.py --out {args.out} --steps "
                                         f"{args.steps} --threads {args.threads}`\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
