"""SketchTune: compress linears into fine-tunable sketches (4-bit codes + per-row tables), then train the tables.

Fitting (`fit.py`, `hessian.py`), storage (`pack.py`), the layer (`layer.py`), the config (`config.py`).
"""
from .config import SketchTune

__all__ = ["SketchTune"]
