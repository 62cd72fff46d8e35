"""Calibration and held-out text for sketches: the humaneval-tests built-in or a text file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...builtin_datasets import HUMANEVAL_TESTS
from ...data.humaneval import load_split
from ...errors import LeantuneError
from ...loss import causal_lm_loss


def _humaneval_text(split: str) -> str:
    records = load_split(split)
    texts = []
    for record in records:
        parts = [record.get("prompt") or record.get("function") or "", record.get("completion") or ""]
        texts.append("".join(parts))
    return "\n\n".join(t for t in texts if t)


def check_source(source: str) -> Path | None:
    """The file behind `source` (None for the built-in); an error if it is neither."""
    if source == HUMANEVAL_TESTS:
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        raise LeantuneError(f"calibration source '{source}' is neither '{HUMANEVAL_TESTS}' nor an existing text file")
    return path


def source_name(source: str) -> str:
    """How to record `source`: the built-in's name, or the file's absolute path (it stays findable)."""
    path = check_source(source)
    return HUMANEVAL_TESTS if path is None else str(path.resolve())


def source_text(source: str, split: str) -> str:
    """The text of `source`: the built-in's `split` ("train" to calibrate, "test" held out) or a file."""
    path = check_source(source)
    if path is None:
        return _humaneval_text(split)
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise LeantuneError(f"calibration file '{source}' is not UTF-8 text") from None


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets (samples x seq_len)."""
    if ids.numel() < seq_len:
        raise LeantuneError(f"the calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def consecutive_windows(ids: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens from the start (for perplexity)."""
    count = ids.numel() // seq_len
    if limit is not None:
        count = min(count, limit)
    if count == 0:
        raise LeantuneError(f"the held-out text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    return ids[:count * seq_len].view(count, seq_len)


def calibration_ids(tokenizer: Any, source: str, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    return random_windows(tokenize(tokenizer, source_text(source, "train")), samples, seq_len, seed)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over the windows (chunked head: no full logits)."""
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        total += float(causal_lm_loss(model, batch, batch, num_items=1))
        count += batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))
