"""`leantune export`: write a saved leantune adapter in another format (Hugging Face PEFT)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LeantuneError

FORMATS = ("peft",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "example: leantune export --adapter out/adapter --format peft --out out/peft"
    parser.add_argument("--adapter", required=True, help="a leantune adapter directory (from save_adapter or train)")
    parser.add_argument("--format", default="peft", choices=FORMATS,
                        help="peft: Hugging Face PEFT adapter_config.json + adapter_model.safetensors (default)")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--model", default=None,
                        help="base model the adapter belongs to (default: the one named in the adapter)")
    parser.add_argument("--force", action="store_true", help="replace --out if it already exists")


def run(args: argparse.Namespace) -> int:
    from ..io import load_adapter, read_adapter_config
    from ..models import load_model
    from ..peft_format import export_peft

    out = Path(args.out)
    if out.exists() and not args.force:
        raise LeantuneError(f"output '{out}' already exists; choose another --out or pass --force")
    document = read_adapter_config(args.adapter)
    base = args.model or document.get("base_model")
    if not base:
        raise LeantuneError(f"adapter '{args.adapter}' does not name its base model; pass --model")
    model = load_adapter(load_model(base), args.adapter)
    export_peft(model, out)
    print(f"wrote a Hugging Face PEFT adapter ({document['method']['name']}) to {out}")
    return 0
