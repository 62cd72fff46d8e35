"""Method configs, one file each; importing this package registers them all."""
from .base import METHODS, AdapterLayer, MethodConfig, config_from_dict, method_class
from .lora import LoRA
from .dora import DoRA
from .ia3 import IA3
from .bitfit import BitFit
from .full import Full
from .paca import PaCA, paca_to_lora
from .sketch import SketchTune

__all__ = ["METHODS", "AdapterLayer", "MethodConfig", "config_from_dict", "method_class", "LoRA", "PaCA", "paca_to_lora"]
__all__ += ["DoRA", "IA3", "BitFit", "Full"]
