"""`leantune export`: a saved adapter as a Hugging Face PEFT adapter, or merged into a plain model."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LeantuneError

FORMATS = ("peft", "merged")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples: leantune export --adapter out/adapter --format peft --out out/peft; "
                     "leantune export --adapter out/adapter --format merged --out out/model")
    parser.add_argument("--adapter", required=True, help="a leantune adapter directory (from save_adapter or train)")
    parser.add_argument("--format", default="peft", choices=FORMATS,
                        help="peft: Hugging Face PEFT adapter_config.json + adapter_model.safetensors (default); "
                             "merged: the base model with the adapter folded in, as a Hugging Face model folder "
                             "(config.json, model.safetensors, tokenizer) for any mergeable method (not bottleneck adapters, prompt or prefix tuning)")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--model", default=None,
                        help="base model the adapter belongs to (default: the one named in the adapter)")
    parser.add_argument("--force", action="store_true", help="replace --out if it already exists")


def run(args: argparse.Namespace) -> int:
    # imported here, not at module level: `leantune --help` must not load torch
    from ..adapters import export_peft, load_adapter, read_adapter_config, save_merged_model
    from ..files import check_output_path
    from ..models import load_model, load_tokenizer

    out = Path(args.out)
    _check_apart(args.out, args.adapter)
    check_output_path(out, directory=True)
    if out.exists() and not args.force:
        raise LeantuneError(f"output '{out}' already exists; choose another --out or pass --force")
    document = read_adapter_config(args.adapter)
    base = args.model or document.get("base_model")
    if not base:
        raise LeantuneError(f"adapter '{args.adapter}' does not name its base model; pass --model")
    model = load_adapter(load_model(base), args.adapter)
    method = document["method"]["name"]
    if args.format == "merged":
        save_merged_model(model, out, load_tokenizer(base), in_place=True)
        print(f"wrote {base} with the {method} adapter merged in to {out} (load it as a plain model folder)")
        return 0
    export_peft(model, out)
    print(f"wrote a Hugging Face PEFT adapter ({method}) to {out}")
    return 0


def _check_apart(out: str, adapter: str) -> None:
    """--out must not overlap --adapter: replacing --out (with --force) would delete the adapter being read."""
    out_path, adapter_path = Path(out).resolve(), Path(adapter).resolve()
    relation = ("is" if out_path == adapter_path else "contains" if out_path in adapter_path.parents
                else "lies inside" if adapter_path in out_path.parents else None)
    if relation is not None:
        raise LeantuneError(f"--out '{out}' {relation} --adapter '{adapter}'; choose an --out outside the adapter")
