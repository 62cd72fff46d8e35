"""What a run shows and records: the progress bar, metrics.jsonl (+ TensorBoard if installed), the summary."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl; mirrors scalars to TensorBoard when available.

    A resumed run first drops the records written after its checkpoint, so every step appears once.
    """

    def __init__(self, out_dir: Path, truncate_after: int | None = None):
        self.path = Path(out_dir) / METRICS_FILE
        if truncate_after is not None and self.path.is_file():
            self._truncate(truncate_after)
        self.handle = open(self.path, "a", encoding="utf-8")
        self.tensorboard = _tensorboard_writer(Path(out_dir) / "tensorboard")

    def _truncate(self, last_step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("step", 0) <= last_step:
                kept.append(line)
        self.path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


class NoMetrics:
    """The metrics log of a process that writes nothing (every rank of a distributed run but 0)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))


class Progress:
    """A tqdm bar over optimizer steps with loss, learning rate and tokens/s; tqdm adds the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(self, loss: float, lr: float, tokens_per_s: float) -> None:
        self.bar.set_postfix_str(f"loss={loss:.4f} lr={lr:.2e} tok/s={tokens_per_s:,.0f}", refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        if self.bar.disable:
            print(message, file=sys.stderr, flush=True)
        else:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on CUDA; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource  # POSIX only: elsewhere the peak is not measured
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _per_process_lines(summary: dict[str, Any]) -> list[str]:
    if "processes" not in summary:
        return []

    def mib(key: str) -> str:
        return " / ".join(f"{value / 2**20:,.1f}" for value in summary[key])

    return [f"  {summary['processes']} processes ({summary['distributed']}), MiB per process: peak "
            f"{mib('peak_memory_bytes_per_process')}, model tensors {mib('model_bytes_per_process')}, "
            f"optimizer state {mib('optimizer_bytes_per_process')}"]


def format_summary(summary: dict[str, Any]) -> str:
    def loss(value: Any) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [
        "training finished:",
        f"  steps {summary['steps']} ({summary['epochs']} epochs), {summary['tokens']:,} tokens "
        f"({summary['loss_tokens']:,} with loss) in {summary['time_s']:.1f} s ({summary['tokens_per_s']:,.0f} tokens/s)",
        *([f"  of which compiling {summary['compile_s']:.1f} s (compile: true)"] if "compile_s" in summary else []),
        f"  peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB",
        *_per_process_lines(summary),
        f"  eval loss before {loss(summary['eval_loss_before'])}, after {loss(summary['eval_loss_after'])}",
        f"  adapter saved to {summary['adapter']}",
    ]
    return "\n".join(lines)
