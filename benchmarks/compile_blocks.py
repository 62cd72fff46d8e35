"""The `compile: true` lever on the benchmark step: eager against per-decoder-block `torch.compile`.

    python benchmarks/compile_blocks.py --out benchmarks/results/DATE-cpu-compile [--rows floor,paca] [--repeats 2]

Each (row, eager|compiled, repeat) runs in a fresh process, interleaved: `leantune bench`'s step
(SmolLM2-135M, float32, batch 4 x 256 tokens, the chunked loss, AdamW) built by its worker, blocks
compiled as `leantune train --set compile=true` compiles them (`training.runtime.compile_decoder_blocks`).
The first step (compiling, or the eager warm-up) is reported apart; then one untimed step and
`--steps` timed ones.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROW_SETTINGS = {"floor": None, "paca": {"name": "paca", "r": 16}, "lora": {"name": "lora", "r": 8},
                "full": {"name": "full"}}


def measure(row: str, compiled: bool, steps: int) -> dict:
    """In this (fresh) process: the first step, then `steps` timed ones."""
    import torch

    from leantune.bench.worker import WorkerSpec, build_model, make_optimizer, make_step
    from leantune.training.runtime import compile_decoder_blocks

    spec = WorkerSpec(row=row, kind="floor" if row == "floor" else "leantune", settings=ROW_SETTINGS[row],
                      model="smollm2-135m", batch=4, seq=256, steps=steps, warmup=1, loss="chunked")
    torch.manual_seed(0)
    model = build_model(spec)
    if compiled:
        compile_decoder_blocks(model)
    input_ids = torch.randint(0, model.config.vocab_size, (spec.batch, spec.seq), generator=torch.Generator().manual_seed(0))
    step = make_step(model, input_ids, make_optimizer(model, spec), spec.loss)
    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"row": row, "compiled": compiled, "first_step_s": round(first, 2), "step_times_s": [round(t, 4) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default="floor,paca")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "ROW:0|1": measure one configuration in this process
    args = parser.parse_args()
    if args.one:
        row, compiled = args.one.split(":")
        print(json.dumps(measure(row, compiled == "1", args.steps)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(["python", *sys.argv]), "runs": []}
    for repeat in range(args.repeats):
        for row in args.rows.split(","):
            for compiled in (False, True):
                done = subprocess.run([sys.executable, __file__, "--out", str(out), "--steps", str(args.steps),
                                       "--one", f"{row}:{int(compiled)}"], check=True, capture_output=True, text=True)
                run = json.loads(done.stdout.strip().splitlines()[-1]) | {"repeat": repeat}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
                (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", "",
             "| row | blocks | median step s (min-max) | first step s | x eager | x eager floor |", "|---|---|---|---|---|---|"]
    medians = {}
    for run in results["runs"]:
        medians.setdefault((run["row"], run["compiled"]), []).extend(run["step_times_s"])
    floor = statistics.median(medians.get(("floor", False), [float("nan")]))
    for (row, compiled), times in medians.items():
        first = [r["first_step_s"] for r in results["runs"] if r["row"] == row and r["compiled"] == compiled]
        eager = statistics.median(medians[(row, False)])
        median = statistics.median(times)
        lines.append(f"| {row} | {'compiled' if compiled else 'eager'} | {median:.3f} ({min(times):.3f}-{max(times):.3f}) | "
                     f"{statistics.median(first):.1f} | {median / eager:.2f} | {median / floor:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
