"""leantune: parameter-efficient fine-tuning that saves time and memory, not only parameters."""
from .adapters import export_peft, import_peft, load_adapter, save_adapter, save_merged_model
from .api import attach, attached, detach, disabled, merge, summary, unmerge, use
from .convert import paca_to_lora
from .errors import LeantuneError
from .methods import IA3, BitFit, DoRA, Full, LoRA, MethodConfig, PaCA, SketchTune
from .models import load_model, load_tokenizer
from .training import train

__version__ = "0.1.0"

__all__ = [
    "attach", "attached", "detach", "disabled", "merge", "summary", "unmerge", "use", "train",
    "LeantuneError", "load_adapter", "save_adapter", "save_merged_model", "export_peft", "import_peft",
    "LoRA", "DoRA", "IA3", "BitFit", "Full", "PaCA", "SketchTune", "paca_to_lora", "MethodConfig",
    "load_model", "load_tokenizer",
]
