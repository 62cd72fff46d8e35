"""The study's charts (matplotlib, optional): each metric per method with its 95% interval, and
quality against cost (pass rate against training time and against the trainable share)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

METRICS = (("parse", "syntax %"), ("pass", "pass %"), ("pass_with_call", "pass, calling the function %"),
           ("line_coverage", "line coverage %"),
           ("branch_coverage", "branch coverage %"), ("mutation_score", "mutation score % (all)"),
           ("codebleu", "CodeBLEU ×100"))


def write_charts(out: Path, prefix: str, rows: list[dict[str, Any]]) -> list[str]:
    """File names of the PNGs written into `out` (none without matplotlib, said in one line)."""
    try:
        import matplotlib  # optional: the 'bench' extra brings it
    except ImportError:
        print("study: charts skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return []
    matplotlib.use("Agg")  # before pyplot, which would otherwise pick a display backend
    from matplotlib import pyplot  # after the backend choice above
    names = [f"{prefix}-metrics.png", f"{prefix}-cost.png"]
    _metrics_chart(pyplot, rows, out / names[0])
    _cost_chart(pyplot, rows, out / names[1])
    return names


def _metrics_chart(pyplot: Any, rows: list[dict[str, Any]], path: Path) -> None:
    figure, axes = pyplot.subplots(2, 4, figsize=(18, 8))
    axes.flat[-1].axis("off")
    labels = [row["label"] for row in rows]
    for axis, (key, title) in zip(axes.flat, METRICS):
        values, low, high = [], [], []
        for row in rows:
            e = row["estimates"][key]
            value = 100 * (e["value"] or 0.0)
            values.append(value)
            low.append(max(0.0, value - 100 * (e["low"] if e["low"] is not None else e["value"] or 0.0)))
            high.append(max(0.0, 100 * (e["high"] if e["high"] is not None else e["value"] or 0.0) - value))
        axis.bar(range(len(rows)), values, yerr=[low, high], capsize=3, color="#4C72B0")
        axis.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
        axis.set_title(title)
        axis.set_ylim(0, 100)
    figure.suptitle("Generated unit tests per method (bars: 95% intervals)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def _cost_chart(pyplot: Any, rows: list[dict[str, Any]], path: Path) -> None:
    trained = [row for row in rows if row["train_seconds"] is not None]
    figure, (by_time, by_share) = pyplot.subplots(1, 2, figsize=(12, 5))
    for row in trained:
        e = row["estimates"]["pass_with_call"]
        value = 100 * (e["value"] or 0.0)
        error = [[max(0.0, value - 100 * (e["low"] or 0.0))], [max(0.0, 100 * (e["high"] or 0.0) - value)]]
        by_time.errorbar(row["train_seconds"], value, yerr=error, fmt="o", capsize=3)
        by_time.annotate(row["label"], (row["train_seconds"], value), fontsize=8, xytext=(4, 4),
                         textcoords="offset points")
        by_share.errorbar(100 * row["share"], value, yerr=error, fmt="o", capsize=3)
        by_share.annotate(row["label"], (100 * row["share"], value), fontsize=8, xytext=(4, 4),
                          textcoords="offset points")
    for row in rows:
        if row["train_seconds"] is None:  # the base rows: a line to beat
            value = 100 * (row["estimates"]["pass_with_call"]["value"] or 0.0)
            for axis in (by_time, by_share):
                axis.axhline(value, linestyle="--", linewidth=1, color="grey")
                axis.annotate(row["label"], (0, value), xycoords=("axes fraction", "data"), fontsize=7,
                              color="grey", xytext=(2, 2), textcoords="offset points")
    by_time.set_xlabel("training time (s)")
    by_share.set_xlabel("trainable parameters (% of the model, log)")
    by_share.set_xscale("log")
    for axis in (by_time, by_share):
        axis.set_ylabel("pass, calling the function %")
        axis.set_ylim(0, 100)
    figure.suptitle("Quality against cost")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
