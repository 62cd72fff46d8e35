"""Helpers shared by several test files (fixtures live in conftest.py)."""
from __future__ import annotations

IGNORE = -100

# SketchTune calibration text: short, repetitive code that a tiny model sketches in seconds.
CALIB_TEXT = "\n".join(
    f"def add_{i}(a, b):\n    return a + b * {i}\n\nassert add_{i}(1, 2) == {1 + 2 * i}\n" for i in range(60))


def sketch_config(calib_file, **kwargs):
    from leantune.methods.sketch import SketchTune

    return SketchTune(calib=calib_file, samples=4, seq_len=48, **kwargs)


def _byte_ids() -> dict[int, int]:
    """Byte -> token id of the tiny models' byte-level tokenizer, written out independently of it.

    GPT-2's byte-to-unicode table maps the printable bytes to themselves and the other 68 bytes to
    chr(256 + n) in byte order; the vocabulary is those 256 characters sorted by code point.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    order = sorted(chars.values())
    return {b: order.index(c) for b, c in chars.items()}


BYTE_IDS = _byte_ids()


def byte_ids(text: str) -> list[int]:
    return [BYTE_IDS[b] for b in text.encode("utf-8")]


def pair_example(prompt: str, completion: str, eos: int) -> tuple[list[int], list[int]]:
    """Prompt/completion data by hand: loss on the completion and the end token, none on the prompt."""
    completion_ids = byte_ids(completion) + [eos]
    return byte_ids(prompt) + completion_ids, [IGNORE] * len(byte_ids(prompt)) + completion_ids


def chatml_example(messages: list[dict[str, str]], im_start: int, im_end: int) -> tuple[list[int], list[int]]:
    """A ChatML conversation by hand: each turn is `<|im_start|>role\\ncontent<|im_end|>\\n`; loss only on
    what an assistant turn writes after its `<|im_start|>assistant\\n` header."""
    ids: list[int] = []
    labels: list[int] = []
    for message in messages:
        header = [im_start] + byte_ids(message["role"] + "\n")
        body = byte_ids(message["content"]) + [im_end] + byte_ids("\n")
        ids += header + body
        labels += [IGNORE] * len(header) + (body if message["role"] == "assistant" else [IGNORE] * len(body))
    return ids, labels
