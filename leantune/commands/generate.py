"""`leantune generate`: text from a base model or a saved adapter, greedy or sampled, with stop strings."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import LeantuneError

EPILOG = """\
One prompt prints its continuation; a JSONL file of {"prompt": ...} records prints one JSON line
{"prompt", "generation"} per record (or writes them to --output).

examples:
  leantune generate --adapter out/adapter --prompt "def add(a, b):" --stop "\\ndef "
  leantune generate --adapter out/adapter --prompts prompts.jsonl --temperature 0.8 --top-p 0.95
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--adapter", metavar="DIR", help="a saved adapter directory (its base model is loaded under it)")
    parser.add_argument("--model", metavar="NAME", help="base model (default: the adapter's recorded base model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", metavar="FILE.jsonl", help='a JSONL file of {"prompt": ...} records')
    parser.add_argument("--output", metavar="FILE.jsonl", help="with --prompts: write the results here instead of stdout")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate at most (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default: 1.0)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when the generation contains TEXT (repeatable; backslash escapes such as \\n work)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts per batch (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")


def decode_escapes(text: str) -> str:
    """`\\n`, `\\t` and friends typed on a command line become the characters they name."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as err:
        raise LeantuneError(f"--stop {text!r}: bad escape sequence ({err.reason})") from None


def read_prompts(path: str) -> list[str]:
    from ..data.formats import read_jsonl  # leantune.data loads torch: `leantune --help` must not

    file = Path(path).expanduser()
    if file.is_dir():
        raise LeantuneError(f"prompts file '{path}' is a directory; expected a .jsonl file of {{\"prompt\": ...}} records")
    if not file.is_file():
        raise LeantuneError(f"prompts file '{path}' does not exist")
    records = read_jsonl(file)
    if not records:
        raise LeantuneError(f"prompts file '{path}' holds no records")
    prompts = []
    for line, record in records:
        if not isinstance(record.get("prompt"), str):
            raise LeantuneError(f"{file}, line {line}: expected a string under the key 'prompt'")
        if not record["prompt"]:
            raise LeantuneError(f"{file}, line {line}: the prompt is empty; give the model some text to continue")
        prompts.append(record["prompt"])
    return prompts


def run(args: argparse.Namespace) -> int:
    # imported here, not at module level: `leantune --help` must not load torch
    from ..eval.generation import generate
    from ..eval.loading import load_for_inference
    from ..files import atomic_write_text, check_output_path

    if args.output and not args.prompts:
        raise LeantuneError("--output goes with --prompts FILE.jsonl")
    if args.output:  # now, not after generating, which can take minutes
        check_output_path(args.output, directory=False)
    if args.prompt == "":
        raise LeantuneError("--prompt is empty; give the model some text to continue")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    stop = [decode_escapes(s) for s in args.stop]
    if any(not s for s in stop):
        raise LeantuneError("--stop needs a non-empty string")
    model, tokenizer = load_for_inference(args.adapter, args.model)
    texts = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, stop=stop, batch_size=args.batch_size, seed=args.seed)
    if args.prompt is not None:
        print(texts[0])
        return 0
    lines = "".join(json.dumps({"prompt": p, "generation": t}) + "\n" for p, t in zip(prompts, texts))
    if args.output:
        atomic_write_text(args.output, lines)
        print(f"wrote {len(texts)} generations to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0
