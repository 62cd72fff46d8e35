"""Writes a benchmark run: results.json, results.md (the tables), chart.png and profile.md.

The tables are rewritten (each file atomically) after every measurement, so a run that dies or is
stopped keeps what it measured; the chart comes last and only where matplotlib is installed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

from ..errors import LeantuneError
from ..files import atomic_write_bytes, atomic_write_text
from .targets import target_rows

MIB = 2**20
RESULT_FILES = ("results.json", "results.md", "profile.md", "chart.png")
CHART_FILE = "chart.png"


# -- the machine -------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _total_memory(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    info["peft"] = _installed_version("peft")
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _installed_version(package: str) -> str | None:
    """The version of an installed package, without importing it (peft would pull in bitsandbytes)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def device_label(device: str) -> str:
    """'cpu', or 'cuda-' plus the GPU's name as a path-safe slug."""
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out_dir(device: str, today: datetime.date | None = None) -> Path:
    day = (today or datetime.date.today()).isoformat()
    return Path("benchmarks") / "results" / f"{day}-{device_label(device)}"


# -- formatting helpers ------------------------------------------------------------------------

def _mib(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / MIB:,.0f}" if abs(value) >= 100 * MIB else f"{value / MIB:,.2f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _label(entry: dict[str, Any], both_losses: bool) -> str:
    return f"{entry['row']} ({entry['loss']} loss)" if both_losses else entry["row"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def measurement_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    table = []
    for e in rows:
        if e.get("error"):
            table.append([e["row"], e["loss"], *["–"] * 9, f"error: {e['error']}"])
            continue
        step = e["step_time_s"]
        base = e.get("adapted_base_bytes") or {}
        longest = e.get("max_seq_len") or {}
        note = "; ".join(sorted(set(e.get("errors") or [])))
        if longest.get("error"):
            note = "; ".join(filter(None, [note, f"max seq len: {longest['error']}"]))
        table.append([
            e["row"], e["loss"],
            f"{step['median']:.3f} ({step['min']:.3f}–{step['max']:.3f})",
            f"{e['tokens_per_s']:,.0f}",
            f"{e['matmul_bound_share']:.0%}" if e.get("matmul_bound_share") else "–",
            _mib(e["peak_memory_bytes"]["median"]),
            _mib((e.get("peak_delta_bytes") or {}).get("median")),
            _mib(e["saved_bytes"]),
            f"{e['trainable_params']:,}",
            _mib(base["stored"]) if base.get("stored") else "–",
            str(longest["value"]) if longest.get("value") is not None else "–",
            note,
        ])
    return table


def ratio_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    table = []
    for e in rows:
        if e.get("error"):
            continue
        peft = e["ratios"].get("peft-lora", {})
        floor = e["ratios"].get("floor", {})
        lora = e["ratios"].get("lora", {})
        twin = e.get("peft_counterpart")
        vs_twin = e["ratios"].get(twin, {}) if twin else {}
        table.append([
            e["row"], e["loss"],
            _x(peft.get("step_time")), _x(floor.get("step_time")), _x(lora.get("step_time")),
            _x(peft.get("peak_memory")), _x(peft.get("saved_bytes")), _x(peft.get("saved_above_floor")),
            _x(peft.get("max_seq_len")),
            f"{twin}: time {_x(vs_twin.get('step_time'))}, saved {_x(vs_twin.get('saved_bytes'))}" if vs_twin else "–",
        ])
    return table


def render_markdown(document: dict[str, Any]) -> str:
    rows, settings, machine = document["rows"], document["settings"], document["machine"]
    lines = [
        f"# leantune bench: {settings['model']}, batch {settings['batch']} × {settings['seq']} tokens, {machine['device']}",
        "",
        f"Command: `{document['command']}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"torch {machine['torch']}, transformers {machine['transformers']}, peft {machine['peft']}"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + (f"; load average at start {machine['load_average'][0]:.2f}" if machine.get("load_average") else ""),
        "",
        f"Date: {document['date']}. {settings['steps']} timed steps after {settings['warmup']} warm-up step(s) "
        f"(plus one untimed step that counts the bytes saved for backward), {settings['repeats']} repeats, "
        "each configuration in its own process, interleaved; times are medians (min–max) over all timed steps.",
        "",
        "## Measurements",
        "",
    ]
    if not document.get("complete", True):
        lines[-2:-2] = [f"**Partial results**: {document.get('progress', 'the run has not finished')}; "
                        "rows not listed were not measured yet.", ""]
    memory_word = "peak CUDA allocated MiB" if machine["device"].startswith("cuda") else "peak RSS MiB"
    lines += _table(["row", "loss", "step s", "tokens/s", "of matmul bound", memory_word, "Δ peak over load MiB",
                     "saved for backward MiB", "trainable params", "adapted base weights MiB",
                     "max seq len", "note"], measurement_rows(rows))
    rates = [e["gemm_flops_per_s"] for e in rows if e.get("gemm_flops_per_s")]
    if rates:
        lines += ["", f"Of matmul bound: the step's matmul work as PyTorch's FLOP counter sees it run (forward, "
                      f"input gradients, attention, the head on loss positions, the adapter's own products: "
                      f"`leantune/bench/bound.py`) over its median time, as a share of this machine's rate on "
                      f"one GEMM of the model's largest linear shape, measured in each row's process "
                      f"({min(rates) / 1e9:.0f}–{max(rates) / 1e9:.0f} GFLOP/s)."]
    lines += ["", "## Ratios (same loss)", ""]
    lines += _table(["row", "loss", "time ×PEFT LoRA", "time ×floor", "time ×LoRA", "peak ×PEFT LoRA",
                     "saved ×PEFT LoRA", "saved above floor ×PEFT LoRA", "max seq ×PEFT LoRA",
                     "vs PEFT counterpart"], ratio_rows(rows))
    pairs = [e for e in rows if e.get("chunked_vs_full")]
    if pairs:
        lines += ["", "## Chunked loss against the full-logits loss (chunked ÷ full)", ""]
        lines += _table(["row", "peak memory", "saved for backward", "step time"], [
            [e["row"], _x(e["chunked_vs_full"]["peak_memory"]), _x(e["chunked_vs_full"]["saved_bytes"]),
             _x(e["chunked_vs_full"]["step_time"])] for e in pairs])
    targets = target_rows(rows, document.get("targets") or [])
    if targets:
        lines += ["", "## Targets from the issues", ""]
        lines += _table(["target", "loss", "measured", "met"], targets)
    if settings.get("max_seq_len"):
        lines += ["", f"Max seq len: the longest sequence (batch 1, multiples of {settings['seq_step']}, "
                      f"up to {settings['seq_limit']}) whose training step keeps the peak memory under "
                      f"{settings['mem_cap_bytes'] / 2**30:.2f} GiB."]
    if document.get("chart"):
        lines += ["", f"![step time and peak memory per method]({document['chart']})"]
    lines += [""]
    return "\n".join(lines)


def render_profile(document: dict[str, Any]) -> str:
    lines = ["# Where the time of one step goes", "",
             "One profiled step per row (torch.profiler, self time per operator, grouped). "
             "The profiler adds overhead, so compare shares, not absolute times.", ""]
    for e in document["rows"]:
        profile = e.get("profile")
        if not profile:
            continue
        total = sum(profile["groups_ms"].values()) or 1.0
        lines += [f"## {e['row']} ({e['loss']} loss)", "",
                  "Phases: " + ", ".join(f"{k} {v:.0f} ms" for k, v in profile["phases_ms"].items()), ""]
        lines += _table(["group", "ms", "share"], [[g, f"{ms:.1f}", f"{100 * ms / total:.1f}%"]
                                                   for g, ms in profile["groups_ms"].items()])
        lines += ["", "Top operators: " + ", ".join(f"`{name}` {ms:.1f} ms" for name, ms in profile["top_ops_ms"]), ""]
    return "\n".join(lines)


def chart_unavailable() -> str | None:
    """Why chart.png cannot be drawn here, or None when it can."""
    try:
        import matplotlib  # noqa: F401  (optional: the 'bench' extra brings it)
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or install leantune with its 'bench' extra)"
    return None


def chart_png(document: dict[str, Any]) -> bytes:
    """Step time and peak memory of every measured row, as PNG bytes."""
    import matplotlib  # optional: the 'bench' extra brings it

    matplotlib.use("Agg")  # before pyplot, which would otherwise pick a display backend
    import matplotlib.pyplot as plt

    both = len(document["settings"]["losses"]) > 1
    rows = [e for e in document["rows"] if not e.get("error")]
    labels = [_label(e, both) for e in rows]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(max(10, 0.9 * len(rows) + 4), 5.5))
    colors = ["#7f7f7f" if e["row"] == "floor" else "#ff7f0e" if e["row"].startswith("peft-") else "#1f77b4"
              for e in rows]
    positions = range(len(rows))

    def bars(axis, pick, scale, title):
        medians = [pick(e)["median"] * scale for e in rows]
        errors = [[(pick(e)["median"] - pick(e)["min"]) * scale for e in rows],
                  [(pick(e)["max"] - pick(e)["median"]) * scale for e in rows]]
        axis.bar(positions, medians, yerr=errors, color=colors, capsize=3)
        for loss in document["settings"]["losses"]:  # the floor of each loss, across that loss's bars
            group = [i for i, e in enumerate(rows) if e["loss"] == loss]
            floor = [medians[i] for i in group if rows[i]["row"] == "floor"]
            if floor:
                axis.hlines(floor[0], min(group) - 0.4, max(group) + 0.4, colors="#404040", linestyles="--", linewidth=1)
        axis.set_xticks(list(positions))
        axis.set_xticklabels(labels, rotation=45, ha="right")
        axis.set_title(title)

    bars(time_axis, lambda e: e["step_time_s"], 1.0, "median step time (s), min–max")
    bars(memory_axis, lambda e: e["peak_memory_bytes"], 1.0 / MIB, "peak memory (MiB); hatched: after loading")
    loaded = [(e.get("memory_after_load_bytes") or {}).get("median", 0) / MIB for e in rows]
    memory_axis.bar(positions, loaded, color="none", edgecolor="white", hatch="//", linewidth=0)
    settings = document["settings"]
    figure.suptitle(f"{settings['model']}, batch {settings['batch']} × {settings['seq']}, "
                    f"{document['machine']['device']} (grey: floor, orange: Hugging Face PEFT)")
    figure.tight_layout()
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def start_results(out_dir: Path) -> None:
    """Check `out_dir` can hold the results and remove an earlier run's files: it never mixes two runs."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LeantuneError(f"cannot write results to '{out_dir}': a file with that name exists")
    for name in RESULT_FILES:
        (out_dir / name).unlink(missing_ok=True)


def write_tables(document: dict[str, Any], out_dir: Path) -> None:
    """results.json, results.md (and profile.md when profiling), each replaced atomically."""
    atomic_write_text(out_dir / "results.json", json.dumps(document, indent=2, sort_keys=False) + "\n")
    atomic_write_text(out_dir / "results.md", render_markdown(document))
    if document["settings"].get("profile"):
        atomic_write_text(out_dir / "profile.md", render_profile(document))


def write_results(document: dict[str, Any], out_dir: Path, log: Callable[[str], None] = print) -> Path:
    """The finished run: the tables, then chart.png when there is a measured row and matplotlib."""
    measured = any(not e.get("error") for e in document["rows"])
    skipped = chart_unavailable() if measured else None
    document = {**document, "complete": True, "chart": CHART_FILE if measured and not skipped else None}
    write_tables(document, out_dir)
    if skipped:
        log(f"chart skipped: {skipped}")
    elif measured:
        atomic_write_bytes(out_dir / CHART_FILE, chart_png(document))
    return out_dir
