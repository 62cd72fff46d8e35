"""The training config: one dataclass, every key documented and defaulted, validated with clear errors.

Sources, later ones winning: the dataclass defaults, a YAML file, then `--set key=value` overrides
(dotted keys reach into mappings: `method.r=16`, `data.eval=null`). Values of overrides are parsed
as YAML scalars, so `16` is an int, `1e-4` a float, `true` a bool and `null` None.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import LeantuneError

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
OVERLONG = ("truncate", "drop")
DEVICES = ("auto", "cpu", "cuda")
DISTRIBUTED = ("none", "ddp", "fsdp")
# The keys a resumed run may change. They decide how long a run goes on and what it reports and
# saves, never which batches, trainable tensors, updates or random draws it has, so the checkpoint
# (adapter, optimizer, RNG, data position) stays exact. A new max_steps or epochs extends the run;
# the learning-rate schedule then spans the new total. Any other changed key is refused: it would
# make the resumed run a different run. out_dir is not compared: it is how --resume finds the run.
RESUMABLE_KEYS = ("max_steps", "epochs", "eval_every", "save_every", "keep_checkpoints", "log_every", "progress",
                  "unit_test_table", "unit_test_limit", "unit_test_max_new_tokens", "distributed",
                  "distributed_timeout_s", "compile")
RUN_LENGTH_KEYS = ("max_steps", "epochs")
# `method: auto` is the embedded default method: PaCA, whose parameters `--set method.KEY=...` may change.
AUTO_METHOD = "auto"
AUTO_METHOD_SETTINGS = {"name": "paca", "r": 16, "alpha": 32}
TIME_PLACEHOLDER = "{time}"
MAPPING_KEYS = ("data", "method")  # the keys dotted overrides may reach into


def _doc(default: Any, doc: str, **kwargs: Any) -> Any:
    if callable(default):
        return field(default_factory=default, metadata={"doc": doc}, **kwargs)
    return field(default=default, metadata={"doc": doc}, **kwargs)


@dataclass
class DataConfig:
    train: str = _doc("humaneval-tests:train",
                      "training data: a .jsonl file of {prompt, completion} or {messages} records, a plain-text file, "
                      "or a built-in name (humaneval-tests, humaneval-tests:test)")
    eval: str | None = _doc("humaneval-tests:test", "held-out data for the eval loss, same kinds as train; null: none")


@dataclass
class TrainConfig:
    model: str = _doc("smollm2-135m", "model: smollm2-135m (embedded), tiny-llama, tiny-qwen2, a Hugging Face folder or hub id")
    method: Any = _doc(AUTO_METHOD, "PEFT method and its parameters, e.g. {name: lora, r: 8, alpha: 16, targets: all-linear}; "
                                    "auto: PaCA r=16 alpha=32 (parameters set on it, e.g. method.r=8, apply to PaCA); "
                                    "--set method.name=... keeps the keys the new method takes and drops the others")
    data: DataConfig = _doc(DataConfig, "data sources: data.train and data.eval")
    max_length: int = _doc(512, "longest sequence in tokens (prompt + completion)")
    overlong: str = _doc("truncate", "examples longer than max_length: truncate or drop (the count is reported)")
    packing: bool = _doc(False, "concatenate short examples into rows of up to max_length tokens; each attends only "
                                "to itself (positions restart per example), checked on the model before training")
    group_by_length: bool = _doc(True, "batch examples of similar length together (less padding), order still shuffled")
    batch_size: int = _doc(4, "examples per micro-batch")
    grad_accum: int = _doc(1, "micro-batches per optimizer step")
    lr: float = _doc(2e-4, "peak learning rate")
    weight_decay: float = _doc(0.0, "AdamW weight decay (never on biases, norms or other 1-D tensors)")
    adam_betas: list = _doc(lambda: [0.9, 0.999], "AdamW betas")
    schedule: str = _doc("cosine", "learning-rate schedule after warmup: constant, linear or cosine (to 0)")
    warmup: float = _doc(0.05, "warmup: a number of steps (>= 1) or a fraction of all steps (< 1)")
    epochs: float | None = _doc(1, "passes over the training data (ignored when max_steps is set); an epoch's last step "
                                   "takes what is left of it, fractional ones too")
    max_steps: int | None = _doc(None, "optimizer steps to run; null: derived from epochs")
    eval_every: int = _doc(0, "eval loss every N steps (0: only before and after training)")
    save_every: int = _doc(50, "checkpoint every N steps (0: only on Ctrl-C)")
    keep_checkpoints: int = _doc(2, "checkpoints kept under out_dir/checkpoints (oldest removed first)")
    out_dir: str = _doc("runs/{time}", "output directory; {time} becomes the start time (with --resume: the newest match)")
    seed: int = _doc(0, "seed for adapter initialisation, data order and dropout")
    precision: str = _doc("fp32", "fp32, or bf16 / fp16 autocast where the device supports it")
    device: str = _doc("auto", "auto (cuda when available, else cpu), cpu or cuda")
    gradient_checkpointing: bool = _doc(False, "recompute decoder activations in backward to save memory")
    fused_ops: bool = _doc(True, "RMSNorm and gated-SiLU MLPs through fused autograd functions in float32: the same "
                                 "function with one tensor less kept per MLP; false: the model's own forwards")
    compile: bool = _doc(False, "torch.compile each decoder block (adapter layers stay eager); the first steps "
                                "pay the compile time, reported apart as compile_s; measured no faster than eager "
                                "on CPU (README)")
    max_grad_norm: float | None = _doc(1.0, "clip the gradient norm to this value; null: no clipping")
    chunked_loss: Any = _doc("auto", "compute head + cross-entropy in token chunks (no full logits): auto (large vocabularies), true, false")
    loss_chunk_tokens: int = _doc(256, "tokens per chunk of the chunked loss")
    threads: int | None = _doc(None, "CPU threads for torch; null: torch's default")
    distributed: str = _doc("none", "under torchrun (or --nproc): ddp (replicated model) or fsdp (FSDP2, sharded); "
                                    "batch_size stays the global micro-batch, split across the processes")
    distributed_timeout_s: int = _doc(600, "seconds a process waits in a collective for the others before the job "
                                           "stops with an error (a rank that died or hangs)")
    log_every: int = _doc(1, "append training metrics to out_dir/metrics.jsonl every N steps")
    progress: bool = _doc(True, "show a progress bar (loss, lr, tokens/s, ETA)")
    unit_test_table: bool = _doc(False, "after training, generate unit tests for the humaneval-tests test split with the "
                                        "base and the tuned model and print the before/after table")
    unit_test_limit: int | None = _doc(None, "held-out functions used by unit_test_table; null: all 40")
    unit_test_max_new_tokens: int = _doc(160, "generation budget per unit test in unit_test_table")

    def __post_init__(self) -> None:
        validate(self)

    def method_config(self) -> Any:
        """A fresh method config object built from `method` (validation already built it once)."""
        return copy.deepcopy(self._method)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- building a config -------------------------------------------------------------------------

def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise LeantuneError(f"config file '{path}' is a directory; expected a YAML file")
    if not path.is_file():
        raise LeantuneError(f"config file '{path}' does not exist")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise LeantuneError(f"config file '{path}'{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise LeantuneError(f"config file '{path}' is not UTF-8 text") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise LeantuneError(f"config file '{path}' must be a mapping of keys to values, got {type(document).__name__}")
    return document


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise LeantuneError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(document: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in `document`. A new `method.name` keeps the method keys it takes and drops the rest."""
    parts = key.split(".")
    if any(not part for part in parts):
        raise LeantuneError(f"config key {key!r} is malformed")
    if len(parts) > 1 and parts[0] not in MAPPING_KEYS:
        raise LeantuneError(f"config key '{parts[0]}' is not a mapping, so {key!r} cannot be set")
    if parts[0] == "method" and len(parts) > 1 and not isinstance(document.get("method"), dict):
        document["method"] = {"name": document.get("method", AUTO_METHOD)}
    if parts == ["method", "name"] and document["method"].get("name") != value:
        document["method"] = switch_method(document["method"], value)
    target = document
    for depth, part in enumerate(parts[:-1]):
        if target.get(part) is None:
            target[part] = {}
        if not isinstance(target[part], dict):
            raise LeantuneError(f"config key '{'.'.join(parts[:depth + 1])}' is not a mapping, so {key!r} cannot be set")
        target = target[part]
    target[parts[-1]] = value


def switch_method(method: dict[str, Any], name: Any) -> dict[str, Any]:
    """`method` renamed to `name`, without the keys that method does not take (named on stderr)."""
    accepted = method_keys(name)
    kept = {key: value for key, value in method.items() if key != "name" and (accepted is None or key in accepted)}
    dropped = [str(key) for key in method if key != "name" and key not in kept]
    if dropped:
        print(f"--set method.name={name}: dropped method keys {', '.join(dropped)}, which {name} does not take"
              + (f" (kept {', '.join(map(str, kept))})" if kept else ""), file=sys.stderr, flush=True)
    return {"name": name, **kept}


def method_keys(name: Any) -> set[str] | None:
    """The keys method `name` takes (`auto`: those of the method it stands for); None for an unknown name,
    which validation then reports."""
    from ..methods import METHODS  # torch-heavy: imported on use, so `--help` stays fast

    concrete = AUTO_METHOD_SETTINGS["name"] if name == AUTO_METHOD else str(name).lower()
    if concrete not in METHODS:
        return None
    return {f.name for f in dataclasses.fields(METHODS[concrete])}


def build_config(document: dict[str, Any] | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A validated TrainConfig from a mapping (e.g. parsed YAML) plus `key=value` overrides."""
    document = _plain_copy(document or {})
    for text in overrides or []:
        apply_override(document, *parse_override(text))
    return from_dict(document)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The config of `leantune train [CONFIG] [--set ...]`; no path: the embedded default job."""
    document = load_yaml(path) if path is not None else default_document()
    return build_config(document, overrides)


def default_document() -> dict[str, Any]:
    """The embedded default job (leantune/configs/default.yaml)."""
    return load_yaml(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")


def from_dict(document: dict[str, Any]) -> TrainConfig:
    if not isinstance(document, dict):
        raise LeantuneError(f"a training config must be a mapping, got {type(document).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    _reject_unknown(document, known, "")
    values = dict(document)
    data = values.pop("data", None)
    if data is None:
        data = {}
    if isinstance(data, str):
        data = {"train": data}
    if not isinstance(data, dict):
        raise LeantuneError(f"config key 'data' must be a mapping with train (and eval), got {data!r}")
    _reject_unknown(data, {f.name for f in dataclasses.fields(DataConfig)}, "data.")
    return TrainConfig(data=DataConfig(**data), **values)


def _reject_unknown(document: dict[str, Any], known: set[str], prefix: str) -> None:
    for key in document:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise LeantuneError(f"unknown config key '{prefix}{key}'{hint}; see leantune train --help for all keys")


def _plain_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_copy(v) for v in value]
    return value


# -- validation ---------------------------------------------------------------------------------

def _fail(key: str, expected: str, value: Any) -> None:
    raise LeantuneError(f"config key '{key}' must be {expected}, got {value!r}")


def _int(config: Any, key: str, minimum: int, optional: bool = False, prefix: str = "") -> None:
    value = getattr(config, key)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(prefix + key, f"an integer >= {minimum}" + (" or null" if optional else ""), value)


def _number(config: Any, key: str, low: float, low_open: bool = False, optional: bool = False) -> None:
    value = getattr(config, key)
    if optional and value is None:
        return
    if isinstance(value, str):
        value = _yaml11_float(value)
        setattr(config, key, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (low_open and value == low):
        _fail(key, f"a number {'>' if low_open else '>='} {low}" + (" or null" if optional else ""), value)


def _yaml11_float(text: str) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; take it as the number it plainly is."""
    try:
        return float(text)
    except ValueError:
        return text


def _choice(config: Any, key: str, choices: tuple) -> None:
    value = getattr(config, key)
    if value not in choices:
        _fail(key, "one of " + ", ".join(map(str, choices)), value)


def _bool(config: Any, key: str) -> None:
    if not isinstance(getattr(config, key), bool):
        _fail(key, "true or false", getattr(config, key))


def _source(config: DataConfig, key: str, optional: bool) -> None:
    value = getattr(config, key)
    if optional and value is None:
        return
    if not isinstance(value, str) or not value.strip():
        _fail(f"data.{key}", "a file path or built-in dataset name" + (" or null" if optional else ""), value)


def validate(config: TrainConfig) -> None:
    """Types and ranges of every key; the method's own fields are checked when it is built."""
    if not isinstance(config.model, str) or not config.model:
        _fail("model", "a model name or folder", config.model)
    if not (config.method == AUTO_METHOD or (isinstance(config.method, dict) and "name" in config.method)):
        _fail("method", f"'{AUTO_METHOD}' or a mapping with a name, e.g. {{name: lora, r: 8}}", config.method)
    _source(config.data, "train", optional=False)
    _source(config.data, "eval", optional=True)
    for key in ("max_length", "batch_size", "grad_accum", "keep_checkpoints", "loss_chunk_tokens", "log_every"):
        _int(config, key, 1)
    _int(config, "max_length", 2)
    for key in ("eval_every", "save_every", "seed", "unit_test_max_new_tokens"):
        _int(config, key, 0)
    _int(config, "max_steps", 1, optional=True)
    _int(config, "threads", 1, optional=True)
    _int(config, "distributed_timeout_s", 1)
    if config.distributed is None:  # YAML's null reads as "none"
        config.distributed = "none"
    _choice(config, "distributed", DISTRIBUTED)
    _int(config, "unit_test_limit", 1, optional=True)
    _number(config, "lr", 0, low_open=True)
    _number(config, "weight_decay", 0)
    _number(config, "warmup", 0)
    if config.warmup >= 1 and config.warmup != int(config.warmup):
        _fail("warmup", "a whole number of steps (>= 1) or a fraction (< 1)", config.warmup)
    _number(config, "max_grad_norm", 0, low_open=True, optional=True)
    if config.max_steps is None:
        _number(config, "epochs", 0, low_open=True)
    betas = config.adam_betas
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        _fail("adam_betas", "two numbers in [0, 1), e.g. [0.9, 0.999]", betas)
    config.adam_betas = [float(b) for b in betas]
    _choice(config, "schedule", SCHEDULES)
    _choice(config, "precision", PRECISIONS)
    _choice(config, "overlong", OVERLONG)
    _choice(config, "device", DEVICES)
    if config.chunked_loss not in ("auto", True, False):
        _fail("chunked_loss", "auto, true or false", config.chunked_loss)
    for key in ("packing", "group_by_length", "gradient_checkpointing", "fused_ops", "compile", "progress", "unit_test_table"):
        _bool(config, key)
    if config.compile and config.distributed != "none":
        raise LeantuneError(f"config key 'compile' works without distributed for now; got distributed: "
                            f"{config.distributed} (set compile: false)")
    if not isinstance(config.out_dir, str) or not config.out_dir.strip():
        _fail("out_dir", "a directory path", config.out_dir)
    config._method = build_method(config)
    if config.gradient_checkpointing and any(m.method_name == "prefix" for m in config._method.components()):
        raise LeantuneError("config key 'gradient_checkpointing': prefix tuning cannot train with it (checkpointed "
                            "layers drop the attention cache that carries the prefixes); set it to false")


def method_dict(config: TrainConfig) -> dict[str, Any]:
    """The concrete method mapping; `auto` (alone or with parameters) is PaCA r=16, alpha=32."""
    given = {"name": config.method} if isinstance(config.method, str) else dict(config.method)
    if given["name"] != AUTO_METHOD:
        return given
    given.pop("name")
    return {**AUTO_METHOD_SETTINGS, **given}  # e.g. `--set method.r=4` on the default job


def build_method(config: TrainConfig) -> Any:
    """The method config object; its own validation errors name the method key."""
    from ..methods import config_from_dict  # torch-heavy: imported on use, so `--help` stays fast

    try:
        return config_from_dict(method_dict(config))
    except (LeantuneError, TypeError) as err:  # TypeError: a value the method's dataclass cannot take
        raise LeantuneError(f"config key 'method': {err}") from None


def expand_out_dir(pattern: str, when: float | None = None) -> str:
    return pattern.replace(TIME_PLACEHOLDER, time.strftime("%Y%m%d-%H%M%S", time.localtime(when)))


def resolved_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as it ran: the concrete method mapping instead of `auto`."""
    document = config.to_dict()
    document["method"] = method_dict(config)
    return document


def to_yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False)


def as_config(config: Any) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a mapping or a YAML path."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return build_config(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise LeantuneError(f"train expects a TrainConfig, a mapping or a YAML path, got {type(config).__name__}")
