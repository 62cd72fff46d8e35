"""leantune: parameter-efficient fine-tuning that saves time and memory, not only parameters.

The public names are imported on first use (PEP 562), so `import leantune.cli` and
`leantune --help` do not pay for torch and transformers.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import LeantuneError

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY: dict[str, str] = {
    **dict.fromkeys(("attach", "attached", "detach", "disabled", "merge", "summary", "unmerge", "use"), ".api"),
    "paca_to_lora": ".convert",
    **dict.fromkeys(("load_adapter", "save_adapter", "save_merged_model", "export_peft", "import_peft"), ".adapters"),
    **dict.fromkeys(("Adapter", "IA3", "BitFit", "DoRA", "Full", "Hybrid", "LoRA", "MethodConfig", "PaCA",
                     "PrefixTuning", "PromptTuning", "SketchTune"), ".methods"),
    **dict.fromkeys(("load_model", "load_tokenizer"), ".models"),
    "train": ".job",
}

__all__ = [
    "attach", "attached", "detach", "disabled", "merge", "summary", "unmerge", "use", "train",
    "LeantuneError", "load_adapter", "save_adapter", "save_merged_model", "export_peft", "import_peft",
    "LoRA", "DoRA", "IA3", "BitFit", "Full", "PaCA", "SketchTune", "Adapter", "PromptTuning", "PrefixTuning",
    "Hybrid", "paca_to_lora", "MethodConfig",
    "load_model", "load_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'leantune' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
