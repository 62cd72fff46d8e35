"""Float32 GEMM rate on this machine: torch's own `F.linear` (MKL) against oneDNN (`leantune.kernels`).

    python benchmarks/gemm_rate.py --out benchmarks/results/DATE-cpu-gemm

The products are a SmolLM2-135M forward's: the 7 projections of all 30 blocks (q, o: 576→576;
k, v: 576→192; gate, up: 576→1536; down: 1536→576), each its own weight so the 106M weights stream
from memory as in a model, for 1, 8 and 32 rows (decode steps), 207 (one prompt's prefill) and
2048 (a training batch of 4 x 512); and the input-gradient product G W of the training batch.
Best of `--repeats` passes each, in one process, both kernels interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from leantune import kernels

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
ROWS = [1, 8, 32, 207, 2048]


def best_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not kernels.available():
        sys.exit("this PyTorch build has no oneDNN (or LEANTUNE_GEMM=torch is set)")
    torch.manual_seed(0)
    weights = [torch.randn(o, i) for o, i in SHAPES]
    macs = sum(w.numel() for w in weights)
    onednn = kernels._onednn_op()
    rows = []
    for count in ROWS:
        inputs = {width: torch.randn(count, width) for width in (576, 1536)}
        torch_ms = best_ms(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], args.repeats)
        onednn_ms = best_ms(lambda: [onednn(inputs[w.shape[1]], w, None, "none", [], "") for w in weights], args.repeats)
        rows.append({"product": f"x Wᵀ, {count} rows", "torch_ms": torch_ms, "onednn_ms": onednn_ms,
                     "gflop": 2 * count * macs / 1e9})
        print(json.dumps(rows[-1]), flush=True)
    grads = {width: torch.randn(2048, width) for width in (576, 192, 1536)}
    torch_ms = best_ms(lambda: [grads[w.shape[0]] @ w for w in weights], args.repeats)
    onednn_ms = best_ms(lambda: [onednn(grads[w.shape[0]], w.t(), None, "none", [], "") for w in weights], args.repeats)
    rows.append({"product": "G W, 2048 rows", "torch_ms": torch_ms, "onednn_ms": onednn_ms, "gflop": 2 * 2048 * macs / 1e9})
    for row in rows:
        row["torch_gflop_s"] = round(row["gflop"] / row["torch_ms"] * 1e3, 1)
        row["onednn_gflop_s"] = round(row["gflop"] / row["onednn_ms"] * 1e3, 1)
        row["speedup"] = round(row["torch_ms"] / row["onednn_ms"], 2)
        row["torch_ms"], row["onednn_ms"], row["gflop"] = (round(row[k], 2) for k in ("torch_ms", "onednn_ms", "gflop"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(["python"] + sys.argv), "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"`{results['command']}` — torch {torch.__version__}, {results['threads']} threads", "",
             "| product (all 210 projections of SmolLM2-135M) | torch F.linear ms | GFLOP/s | oneDNN ms | GFLOP/s | speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['product']} | {r['torch_ms']} | {r['torch_gflop_s']} | {r['onednn_ms']} | {r['onednn_gflop_s']} | "
              f"{r['speedup']}x |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
