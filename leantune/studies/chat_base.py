"""The base model asked the way it was made to be asked: its own chat template and an instruction.

The tuned methods all see the training prompt (instruction comment + function + `def test_x():`)
and continue the body. An instruction-tuned base model given that prompt answers with a code fence
and stops, which measures the prompt rather than the model; so the base row is run twice, with the
training prompt and with the chat template. A chat reply is free-form: the test is taken from it
as the first `def test...` function (of the first code block holding one), renamed to the
name the sandbox calls, with the reply's top-level imports kept (an import of the function under
test is dropped: it is defined beside the test). A reply without a test function keeps its
top-level asserts as the body; a reply with neither becomes the body as written (prose, or an
empty reply, then fails to parse).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from ..data.humaneval import unit_test_header, unit_test_name

FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
TEST_DEF = re.compile(r"^(async\s+)?def\s+test\w*\s*\(")
IMPORT = re.compile(r"^(import\s+\S|from\s+\S+\s+import\s)")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompts(tokenizer: Any, records: Sequence[dict[str, Any]], instruction: str) -> list[str]:
    """One chat-formatted prompt per record: the instruction, then the function in a code block."""
    prompts = []
    for record in records:
        name = record["entry_point"]
        text = instruction.format(name=name, test_name=unit_test_name(name))
        message = {"role": "user", "content": f"{text}\n\n```python\n{record['function']}```"}
        prompts.append(tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True))
    return prompts


def extract_chat_test(record: dict[str, Any], reply: str, hit_budget: bool = False) -> str:
    """The test function a chat reply contains, named as the sandbox calls it (module docstring)."""
    blocks = [m.group(1) for m in FENCE.finditer(reply)]
    # the block with the test (a reply often echoes the function in a block of its own first)
    code = next((b for b in blocks if any(TEST_DEF.match(line) for line in b.splitlines())),
                blocks[0] if blocks else reply)
    lines = code.splitlines()
    name = record["entry_point"]
    imports = [line for line in lines if IMPORT.match(line) and not re.search(rf"\b{re.escape(name)}\b", line)]
    start = next((i for i, line in enumerate(lines) if TEST_DEF.match(line)), None)
    if start is None:
        asserts = [line for line in lines if line.startswith("assert")]
        body = ["    " + line for line in (asserts or lines) if line.strip()]
        return "".join(line + "\n" for line in imports) + unit_test_header(name) + "".join(line + "\n" for line in body)
    body = []
    for line in lines[start + 1:]:
        if line.strip() and not line[0].isspace():
            break
        body.append(line)
    while body and not body[-1].strip():
        body.pop()
    header = unit_test_header(name)
    return "".join(line + "\n" for line in imports) + header + "".join(line + "\n" for line in body)
