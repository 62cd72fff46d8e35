"""Data sources -> tokenized examples (token ids + labels with -100 where no loss is taken).

A source is one of:
- a JSONL file (`.jsonl`, `.json`, `.ndjson`) whose records are `{"prompt", "completion"}` pairs
  (loss on the completion and the end-of-sequence token) or chat `{"messages": [...]}` records
  (rendered with the tokenizer's chat template; loss on the assistant turns only);
- any other file: plain text for language modelling, cut into `max_length` blocks, loss everywhere;
- a built-in name: `humaneval-tests` (its train split) or `humaneval-tests:<split>`.

Every problem with a source is one LeantuneError naming the file (and line, for JSONL).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..builtin_datasets import HUMANEVAL_TESTS, HUMANEVAL_TESTS_SPLITS
from ..errors import LeantuneError
from ..loss import IGNORE_INDEX
from . import humaneval

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass
class Example:
    """One training sequence: `labels[i]` is the token expected at i (-100: no loss there).

    `position_ids` is set on packed rows only: each packed example counts its positions from 0,
    which is also what keeps packed examples from attending to each other (loss.py)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def positions(self) -> int:
        """Positions the sequence needs: its length, or on a packed row its longest example's."""
        return max(self.position_ids) + 1 if self.position_ids else len(self.input_ids)

    def loss_tokens(self) -> int:
        """Tokens that carry loss once labels are shifted (the first position never does)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def builtin_names() -> list[str]:
    return [HUMANEVAL_TESTS] + [f"{HUMANEVAL_TESTS}:{split}" for split in HUMANEVAL_TESTS_SPLITS]


def is_builtin(source: str) -> bool:
    return source.split(":", 1)[0] == HUMANEVAL_TESTS


def load_examples(source: str, tokenizer: Any, max_length: int) -> list[Example]:
    """Read and tokenize `source`; plain text is cut into blocks of `max_length` tokens."""
    if not isinstance(source, str) or not source:
        raise LeantuneError(f"a data source must be a file path or a built-in name, got {source!r}")
    if is_builtin(source):
        examples = [_pair_example(r["prompt"], r["completion"], tokenizer) for r in builtin_records(source)]
        where = source
    else:
        path = existing_file(source)
        if path.suffix.lower() in JSONL_SUFFIXES:
            examples = [_record_example(record, tokenizer, path, line) for line, record in read_jsonl(path)]
        else:
            examples = _text_examples(path, tokenizer, max_length)
        where = f"data file '{source}'"
    if not examples:
        raise LeantuneError(f"{where} holds no examples")
    return examples


def existing_file(source: str) -> Path:
    """The path of a data file; a directory or a missing path is an error naming it."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise LeantuneError(f"data file '{source}' is a directory; expected a .jsonl or plain-text file "
                            "(or a built-in dataset name)")
    if not path.is_file():
        raise LeantuneError(f"data file '{source}' does not exist "
                            f"(built-in datasets: {', '.join(builtin_names())})")
    return path


def builtin_records(source: str) -> list[dict[str, Any]]:
    """The records of a built-in dataset name such as `humaneval-tests:test` (default split: train)."""
    name, _, split = source.partition(":")
    split = split or "train"
    if name != HUMANEVAL_TESTS or split not in HUMANEVAL_TESTS_SPLITS:
        raise LeantuneError(f"unknown built-in dataset '{source}'; built-ins: {', '.join(builtin_names())}")
    records = humaneval.load_split(split)
    for index, record in enumerate(records):
        _require_strings(record, ("prompt", "completion"), f"built-in dataset '{source}', record {index}")
    return records


# -- JSONL ----------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; any bad line is an error naming it."""
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise LeantuneError(f"{path}, line {number}: not valid JSON ({json_problem(err)})") from None
                if not isinstance(record, dict):
                    raise LeantuneError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
                records.append((number, record))
    except UnicodeDecodeError as err:
        raise LeantuneError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise LeantuneError(f"cannot read data file '{path}': {err.strerror}") from None
    return records


def json_problem(err: json.JSONDecodeError) -> str:
    """The parser's message with its column. Some messages end in "at" and expect the position
    after them ("Invalid control character at"); each line is parsed alone, so its line is always 1."""
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


def _record_example(record: dict[str, Any], tokenizer: Any, path: Path, line: int) -> Example:
    where = f"{path}, line {line}"
    if "messages" in record:
        return _chat_example(record["messages"], tokenizer, where)
    if "prompt" in record or "completion" in record:
        _require_strings(record, ("prompt", "completion"), where)
        return _pair_example(record["prompt"], record["completion"], tokenizer)
    keys = ", ".join(repr(k) for k in record) or "none"
    raise LeantuneError(f"{where}: record has keys {keys}; expected 'prompt' and 'completion', or 'messages'")


def _require_strings(record: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if key not in record:
            raise LeantuneError(f"{where}: record lacks the key '{key}'")
        if not isinstance(record[key], str):
            raise LeantuneError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")


# -- tokenization -------------------------------------------------------------------------------

def _encode(tokenizer: Any, text: str, first: bool) -> list[int]:
    """Token ids of `text`; only the first piece of a sequence gets the tokenizer's special prefix (BOS)."""
    return list(tokenizer(text, add_special_tokens=first)["input_ids"])


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LeantuneError("the tokenizer has no end-of-sequence token; prompt/completion data needs one")
    return int(eos)


def _pair_example(prompt: str, completion: str, tokenizer: Any) -> Example:
    """Loss on the completion and the end-of-sequence token that closes it; the prompt is masked."""
    prompt_ids = _encode(tokenizer, prompt, first=True)
    completion_ids = _encode(tokenizer, completion, first=not prompt_ids) + [_eos_id(tokenizer)]
    return Example(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def _chat_example(messages: Any, tokenizer: Any, where: str) -> Example:
    _check_messages(messages, where)
    if not getattr(tokenizer, "chat_template", None):
        raise LeantuneError(f"{where}: chat data needs a tokenizer with a chat template, and this one has none")
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in _chat_segments(messages, tokenizer, where):
        ids = _encode(tokenizer, text, first=False)  # the template writes its own BOS where it wants one
        input_ids += ids
        labels += ids if is_assistant else [IGNORE_INDEX] * len(ids)
    return Example(input_ids, labels)


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise LeantuneError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise LeantuneError(f"{where}: message {index} must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise LeantuneError(f"{where}: the conversation has no 'assistant' message to learn from")


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any, where: str) -> list[tuple[str, bool]]:
    """Split the rendered chat into (text, is_assistant_turn) pieces.

    Each assistant turn is what rendering messages[:i+1] adds to rendering messages[:i] with the
    generation prompt; everything else (system, user, role headers) carries no loss.
    """
    render: Callable[..., str] = lambda msgs, gen: tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=gen)
    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:index], True) if index else render([], True)
        after = render(messages[: index + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise LeantuneError(f"{where}: the chat template does not render turns as prefixes of one another, "
                                "so assistant turns cannot be located")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    full = render(messages, False)
    if full.startswith(done) and len(full) > len(done):
        segments.append((full[len(done):], False))
    return [(text, is_assistant) for text, is_assistant in segments if text]


def _text_examples(path: Path, tokenizer: Any, max_length: int) -> list[Example]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LeantuneError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise LeantuneError(f"cannot read data file '{path}': {err.strerror}") from None
    ids = _encode(tokenizer, text, first=True) if text.strip() else []
    # Blocks of one token carry no loss after the shift.
    return [Example(ids[i:i + max_length], ids[i:i + max_length])
            for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]
