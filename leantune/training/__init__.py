"""The fine-tuning loop and its parts; the job around it (`lt.train`) is `leantune.job`.

Modules: `config` (the TrainConfig and its loading), `keys` (the keys explained, for --help),
`rundir` (out_dir and what a resume may change), `runtime` (device, precision, seed, threads,
which process writes), `loop` (the loop itself), `optim`, `checkpoint` and `reporting`. Importing
this package loads only the config (no torch), so `leantune train --help` stays fast.
"""
from __future__ import annotations

from .config import DataConfig, TrainConfig, build_config, load_config

__all__ = ["DataConfig", "TrainConfig", "build_config", "load_config"]
