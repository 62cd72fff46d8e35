"""leantune: parameter-efficient fine-tuning that saves time and memory, not only parameters."""
from .api import attach, attached, detach, disabled, merge, summary, unmerge
from .errors import LeantuneError
from .io import load_adapter, save_adapter
from .methods import LoRA, MethodConfig
from .methods import BitFit, DoRA, Full, IA3
from .peft_format import export_peft, import_peft
from .methods import PaCA, paca_to_lora
from .methods.sketch import SketchTune
from .models import load_model, load_tokenizer
from . import train  # lt.train(config): the training job (the package is callable)

__version__ = "0.1.0"

__all__ = [
    "attach", "attached", "detach", "disabled", "merge", "summary", "unmerge",
    "LeantuneError", "load_adapter", "save_adapter", "LoRA", "MethodConfig",
    "load_model", "load_tokenizer", "train",
]
__all__ += ["PaCA", "paca_to_lora"]
__all__ += ["DoRA", "IA3", "BitFit", "Full", "export_peft", "import_peft"]
