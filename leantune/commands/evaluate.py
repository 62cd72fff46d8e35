"""`leantune eval`: loss and perplexity of a base model or a saved adapter on a dataset."""
from __future__ import annotations

import argparse
import json

from ..builtin_datasets import HUMANEVAL_TESTS, HUMANEVAL_TESTS_SPLITS
from ..errors import LeantuneError

DEFAULT_DATA = f"{HUMANEVAL_TESTS}:test"

EPILOG = f"""\
Data sources: a JSONL file of {{"prompt", "completion"}} or chat {{"messages"}} records (loss on the
completions / assistant turns), a plain-text file (loss on every token), or a built-in name:
{HUMANEVAL_TESTS}[:{'|'.join(HUMANEVAL_TESTS_SPLITS)}]. The default is the held-out split, {DEFAULT_DATA}.

examples:
  leantune eval --adapter out/adapter
  leantune eval --adapter out/adapter --data my_pairs.jsonl --max-length 1024
  leantune eval --model smollm2-135m        (the base model alone)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--adapter", metavar="DIR", help="a saved adapter directory (its base model is loaded under it)")
    parser.add_argument("--model", metavar="NAME", help="base model (default: the adapter's recorded base model)")
    parser.add_argument("--data", metavar="SOURCE", default=DEFAULT_DATA, help=f"data source (default: {DEFAULT_DATA})")
    parser.add_argument("--max-length", type=int, default=512, metavar="N", help="tokens per example (default: 512)")
    parser.add_argument("--overlong", choices=("truncate", "drop"), default="truncate",
                        help="what to do with longer examples (default: truncate)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="examples per forward pass (default: 8)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.max_length < 2:
        raise LeantuneError(f"--max-length must be at least 2, got {args.max_length}")
    if args.batch_size < 1:
        raise LeantuneError(f"--batch-size must be at least 1, got {args.batch_size}")
    # imported here, not at module level: `leantune --help` must not load torch
    from ..data import prepare_dataset
    from ..eval.loading import load_for_inference
    from ..eval.metrics import loss_and_perplexity

    model, tokenizer = load_for_inference(args.adapter, args.model)
    examples, report = prepare_dataset(args.data, tokenizer, args.max_length, overlong=args.overlong)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = loss_and_perplexity(model, examples, pad_id, batch_size=args.batch_size, progress=not args.json)
    result.update(data=args.data, adapter=args.adapter, model=getattr(model.config, "_name_or_path", args.model),
                  fit=report.describe())
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"{args.data}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
              f"({result['tokens']} loss tokens in {result['fit']})")
    return 0
