"""Method configs, one file each; importing this package registers them all."""
from .base import METHODS, MethodConfig, ModelMethod, ModuleMethod, config_from_dict, method_class
from .layer import AdapterLayer
from .adapter import Adapter
from .bitfit import BitFit
from .dora import DoRA
from .full import Full
from .hybrid import Hybrid
from .ia3 import IA3
from .lora import LoRA
from .paca import PaCA
from .prefix import PrefixTuning
from .prompt import PromptTuning
from .sketch import SketchTune

__all__ = [
    "METHODS", "AdapterLayer", "MethodConfig", "ModelMethod", "ModuleMethod", "config_from_dict", "method_class",
    "LoRA", "DoRA", "IA3", "BitFit", "Full", "PaCA", "SketchTune", "Adapter", "PromptTuning", "PrefixTuning", "Hybrid",
]
