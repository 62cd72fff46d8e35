"""Runs the benchmark: one fresh worker process per configuration, interleaved across repeats.

Rows are run A B C, A B C, … so drift on a shared machine hits every row alike. A worker that
fails, is killed or runs out of memory becomes a row error; the run goes on. The results are
aggregated per row (median and min–max) and compared with PEFT LoRA, the floor and leantune LoRA.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..models import cache_dir
from .rows import FLOOR, PEFT_COUNTERPART, needs_preparation, row_kind, row_settings
from .search import longest_fitting
from .worker import WorkerSpec

POLL_S = 0.05
# Baselines every row is compared with, when they are part of the run.
BASELINES = ("peft-lora", FLOOR, "lora")


@dataclass
class BenchPlan:
    model: str
    rows: list[str]
    losses: list[str]
    batch: int = 4
    seq: int = 256
    steps: int = 3
    warmup: int = 1
    repeats: int = 3
    device: str = "cpu"
    dtype: str = "float32"
    profile: bool = False
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_seq_len: bool = False
    mem_cap: int | None = None
    seq_step: int = 128
    seq_limit: int = 8192
    seq_start: int = 1024
    timeout_s: float = 1800.0

    def spec(self, row: str, loss: str, **changes: Any) -> WorkerSpec:
        base = WorkerSpec(row=row, kind=row_kind(row), settings=row_settings(row, self.overrides),
                          model=self.model, batch=self.batch, seq=self.seq, steps=self.steps,
                          warmup=self.warmup, loss=loss, device=self.device, dtype=self.dtype,
                          preload_peft=any(row_kind(r) == "peft" for r in self.rows))
        return replace(base, **changes)

    def default_runner(self, spec: WorkerSpec) -> dict[str, Any]:
        # On CPU a probe is killed the moment its resident memory passes the cap.
        cap = spec.mem_cap if spec.device == "cpu" else None
        return run_worker(spec, self.timeout_s, rss_cap=cap)


# -- one worker process ----------------------------------------------------------------------

def _rss_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_worker(spec: WorkerSpec, timeout_s: float = 1800.0, rss_cap: int | None = None,
               command: list[str] | None = None) -> dict[str, Any]:
    """Run one configuration in a fresh process and return its result, or a dict with "error".

    With `rss_cap`, the process is killed as soon as its resident memory exceeds the cap (a probe
    that does not fit must not push a shared machine into swap or the OOM killer).
    """
    with tempfile.TemporaryDirectory(prefix="leantune-bench-") as tmp:
        spec_path, out_path, log_path = Path(tmp, "spec.json"), Path(tmp, "result.json"), Path(tmp, "stderr.txt")
        spec_path.write_text(spec.to_json())
        argv = (command or [sys.executable, "-m", "leantune.bench.worker"]) + [str(spec_path), str(out_path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
            killed_for = _watch(proc, timeout_s, rss_cap)
        stderr_tail = _last_line(log_path)
        if out_path.is_file() and killed_for is None:
            try:
                return json.loads(out_path.read_text())
            except json.JSONDecodeError:
                pass
    result: dict[str, Any] = {"row": spec.row, "seq": spec.seq, "batch": spec.batch}
    if killed_for == "memory":
        result.update(error=f"exceeded the memory cap of {_gib(rss_cap)}", out_of_memory=True)
    elif killed_for == "timeout":
        result.update(error=f"timed out after {timeout_s:.0f} s")
    else:
        code = proc.returncode
        # SIGKILL from outside is almost always the kernel's OOM killer.
        result.update(error=f"worker exited with status {code}" + (f": {stderr_tail}" if stderr_tail else ""),
                      out_of_memory=code == -signal.SIGKILL)
    return result


def _watch(proc: subprocess.Popen, timeout_s: float, rss_cap: int | None) -> str | None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        reason = None
        if time.monotonic() > deadline:
            reason = "timeout"
        elif rss_cap is not None and (_rss_of(proc.pid) or 0) > rss_cap:
            reason = "memory"
        if reason:
            proc.kill()
            proc.wait()
            return reason
        time.sleep(POLL_S)
    return None


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _gib(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


# -- the whole run -----------------------------------------------------------------------------

Runner = Callable[[WorkerSpec], dict[str, Any]]
Update = Callable[[list[dict[str, Any]]], None]


def run_plan(plan: BenchPlan, runner: Runner | None = None, log: Callable[[str], None] = print,
             on_update: Update | None = None) -> dict[str, Any]:
    """Measure every (row, loss) configuration `plan.repeats` times, interleaved; aggregate; compare.

    `on_update` receives the rows measured so far (aggregated and compared) after every worker,
    so a caller can keep partial results on disk.
    """
    runner = runner or plan.default_runner
    update = on_update or (lambda rows: None)
    preparation_errors = prepare_rows(plan, runner, log)
    configs = [(row, loss) for loss in plan.losses for row in plan.rows]
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in configs}
    for repeat in range(plan.repeats):
        for row, loss in configs:
            done = samples[(row, loss)]
            if row in preparation_errors:
                done[:] = [{"row": row, "phase": "setup", "error": preparation_errors[row]}]
                continue
            if done and done[-1].get("error") and done[-1].get("phase") == "setup":
                continue  # a setup error (e.g. a method not registered) fails the same way every time
            spec = plan.spec(row, loss, profile=plan.profile and repeat == 0)
            started = time.monotonic()
            result = runner(spec)
            done.append(result)
            log(_progress_line(repeat, plan.repeats, row, loss, result, time.monotonic() - started))
            update(_compared_rows(plan, configs, samples))
    rows = _compared_rows(plan, configs, samples)
    if plan.max_seq_len:
        for entry in rows:
            if not entry.get("error"):
                entry["max_seq_len"] = find_max_seq_len(plan, entry["row"], entry["loss"], runner, log)
                add_ratios(rows)
                update(rows)
    return {"rows": rows}


def _compared_rows(plan: BenchPlan, configs: list[tuple[str, str]],
                   samples: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One aggregated row per configuration measured so far, with its ratios to the baselines."""
    rows = [aggregate(row, loss, samples[(row, loss)], plan) for row, loss in configs if samples[(row, loss)]]
    add_ratios(rows)
    return rows


def prepared_path(plan: BenchPlan, settings: dict[str, Any]) -> Path:
    """Where a prepared artefact for these settings lives: the leantune cache, keyed by their hash."""
    key = json.dumps({"model": plan.model, "dtype": plan.dtype, "settings": settings}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() else "-" for c in plan.model.lower())
    return cache_dir() / "bench" / f"{settings['name']}-{slug}-{digest}"


def prepare_rows(plan: BenchPlan, runner: Runner, log: Callable[[str], None] = print) -> dict[str, str]:
    """Fit once what a row would otherwise refit in every process; point the row at it.

    Returns the rows whose preparation failed, with the error (they become row errors)."""
    errors: dict[str, str] = {}
    for row in plan.rows:
        settings = row_settings(row, plan.overrides)
        if not needs_preparation(settings):
            continue
        path = prepared_path(plan, settings)
        if not path.is_dir():
            log(f"preparing {row}: fitting once into {path}")
            result = runner(plan.spec(row, plan.losses[0], task="prepare", output=str(path)))
            if result.get("error"):
                errors[row] = f"preparation failed: {result['error']}"
                log(f"preparing {row}: error: {result['error']}")
                continue
        plan.overrides.setdefault(row, {})["sketch"] = str(path)
    return errors


def _progress_line(repeat: int, repeats: int, row: str, loss: str, result: dict[str, Any], seconds: float) -> str:
    label = f"[{repeat + 1}/{repeats}] {row} (loss: {loss})"
    if result.get("error"):
        return f"{label}: error: {result['error']}"
    times = result.get("step_times_s") or [float("nan")]
    return f"{label}: median step {statistics.median(times):.3f} s, peak {result.get('peak_memory_bytes', 0) / 2**20:.0f} MiB ({seconds:.0f} s)"


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def aggregate(row: str, loss: str, results: list[dict[str, Any]], plan: BenchPlan) -> dict[str, Any]:
    """One table row from its repeats: step times pooled over repeats, memory per repeat."""
    good = [r for r in results if not r.get("error")]
    errors = [r["error"] for r in results if r.get("error")]
    entry: dict[str, Any] = {"row": row, "loss": loss, "settings": row_settings(row, plan.overrides),
                             "repeats": len(good), "errors": errors, "error": None if good else (errors[0] if errors else "not run")}
    if not good:
        return entry
    times = [t for r in good for t in r["step_times_s"]]
    step = _spread(times)
    entry.update(
        step_time_s=step,
        tokens_per_s=plan.batch * plan.seq / step["median"] if step and step["median"] > 0 else None,
        peak_memory_bytes=_spread([r["peak_memory_bytes"] for r in good]),
        peak_rss_bytes=_spread([r["peak_rss_bytes"] for r in good]),
        memory_after_load_bytes=_spread([r["memory_after_load_bytes"] for r in good
                                         if r.get("memory_after_load_bytes") is not None]),
        peak_delta_bytes=_spread([r["training_peak_bytes"] - r["memory_after_load_bytes"] for r in good
                                  if r.get("memory_after_load_bytes") is not None]),
        saved_bytes=good[0]["saved_bytes"],
        saved_bytes_varies=len({r["saved_bytes"] for r in good}) > 1,
        trainable_params=good[0]["trainable_params"],
        total_params=good[0]["total_params"],
        model_bytes=good[0]["model_bytes"],
        adapted_base_bytes=good[0]["adapted_base_bytes"],
        step_times_s=[r["step_times_s"] for r in good],
    )
    rates = [r["gemm_flops_per_s"] for r in good if r.get("gemm_flops_per_s")]
    if rates and step and step["median"] > 0:  # bench/bound.py: the step's matmul work at this machine's GEMM rate
        entry["gemm_flops_per_s"] = statistics.median(rates)
        entry["matmul_flops"] = good[0]["matmul_flops"]
        entry["matmul_bound_share"] = entry["matmul_flops"] / step["median"] / entry["gemm_flops_per_s"]
    if "cuda_max_allocated_bytes" in good[0]:
        entry["cuda_max_allocated_bytes"] = _spread([r["cuda_max_allocated_bytes"] for r in good])
        entry["cuda_max_reserved_bytes"] = _spread([r["cuda_max_reserved_bytes"] for r in good])
    profiled = [r["profile"] for r in good if r.get("profile")]
    if profiled:
        entry["profile"] = profiled[0]
    return entry


# -- longest sequence under the memory cap ------------------------------------------------------

def find_max_seq_len(plan: BenchPlan, row: str, loss: str, runner: Runner,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Bisection over batch-1 probes, each its own process; a probe that runs out of memory does not fit."""
    probes: list[dict[str, Any]] = []
    failure: list[str] = []

    def fits(seq: int) -> bool:
        if failure:
            return False
        spec = plan.spec(row, loss, batch=1, seq=seq, steps=2, warmup=0, mem_cap=plan.mem_cap)
        result = runner(spec)
        ok = not result.get("error") and bool(result.get("fits"))
        if result.get("error") and not result.get("out_of_memory"):
            failure.append(result["error"])  # not a memory verdict: stop searching, report it
        probes.append({"seq": seq, "fits": ok, "peak_memory_bytes": result.get("peak_memory_bytes"),
                       "error": result.get("error")})
        log(f"  max-seq-len {row} (loss: {loss}): {seq} tokens {'fits' if ok else 'does not fit'}")
        return ok

    longest = longest_fitting(fits, plan.seq_step, plan.seq_limit, start=plan.seq_start)
    return {"value": None if failure else longest, "cap_bytes": plan.mem_cap, "step": plan.seq_step,
            "limit": plan.seq_limit, "probes": probes, "error": failure[0] if failure else None}


# -- comparisons ---------------------------------------------------------------------------------

def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def _metrics(entry: dict[str, Any]) -> dict[str, float | None]:
    if not entry or entry.get("error"):
        return {}
    longest = (entry.get("max_seq_len") or {}).get("value")
    return {
        "step_time": entry["step_time_s"]["median"],
        "peak_memory": entry["peak_memory_bytes"]["median"],
        "saved_bytes": entry["saved_bytes"],
        "max_seq_len": longest or None,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's ratios to the baselines (and to its PEFT counterpart) measured under the same loss."""
    by_key = {(e["row"], e["loss"]): e for e in rows}
    for entry in rows:
        mine = _metrics(entry)
        ratios: dict[str, dict[str, float | None]] = {}
        baselines = [*BASELINES]
        counterpart = PEFT_COUNTERPART.get(entry["row"])
        if counterpart and counterpart not in baselines:
            baselines.append(counterpart)
        floor = _metrics(by_key.get((FLOOR, entry["loss"]), {}))
        for name in baselines:
            other = by_key.get((name, entry["loss"]))
            if other is None or other is entry or not mine or other.get("error"):
                continue
            theirs = _metrics(other)
            ratios[name] = {metric: _ratio(mine[metric], theirs[metric]) for metric in mine}
            if floor and name != FLOOR:
                ratios[name]["saved_above_floor"] = _ratio(mine["saved_bytes"] - floor["saved_bytes"],
                                                           theirs["saved_bytes"] - floor["saved_bytes"])
        entry["ratios"] = ratios
        entry["peft_counterpart"] = counterpart if counterpart in {n for n, _ in by_key} else None
    _add_loss_pairs(rows, by_key)


def _add_loss_pairs(rows: list[dict[str, Any]], by_key: dict[tuple[str, str], dict[str, Any]]) -> None:
    """With both losses measured: each row's chunked-loss figures relative to its full-logits ones."""
    for entry in rows:
        if entry["loss"] != "chunked":
            continue
        full = by_key.get((entry["row"], "full"))
        if full is None or full.get("error") or entry.get("error"):
            continue
        mine, theirs = _metrics(entry), _metrics(full)
        entry["chunked_vs_full"] = {metric: _ratio(mine[metric], theirs[metric]) for metric in mine}
