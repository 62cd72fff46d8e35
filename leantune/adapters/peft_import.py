"""Import of Hugging Face PEFT adapters (LoRA, DoRA, IA3, prompt and prefix tuning): `import_peft` attaches
what PEFT's own loader would apply to the same base, or refuses, naming the key: other PEFT types,
options leantune has no equivalent for, inits that rewrote the base weights (PiSSA, OLoRA, CorDA,
LoRA-GA, LoftQ), and configs that disagree with their tensors. Only safetensors are read; a pickled
`adapter_model.bin` is refused.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LeantuneError
from ..files import load_tensors, read_json_file
from ..methods.base import MethodConfig
from ..methods.dora import DoRA
from ..methods.ia3 import IA3
from ..methods.lora import LoRA
from ..methods.prompt import PromptTuning
from ..methods.prefix import KEYS, VALUES, PrefixTuning, prefix_shape
from ..methods.targets import ALL_LINEAR, candidate_modules, closest_names, output_head_names, resolve_targets, unwrap
from .native import attach_with_state
from .peft_export import PEFT_CONFIG_FILE, PEFT_PICKLE_FILE, PEFT_PREFIX, PEFT_PROMPT_INITS, PEFT_TENSOR_FILE


# fan_in_fan_out is metadata too: PEFT sets it from the module's type (True for a Conv1D, False for a
# Linear, whatever the file says), and leantune wraps a Conv1D as a Linear with the same factors.
PEFT_METADATA_KEYS = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                                "revision", "inference_mode", "fan_in_fan_out"})
# Per importable PEFT type, the config keys import_peft reads.
PEFT_READ_KEYS = {
    "LORA": frozenset({"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights",
                       "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                       # settings that only act through init_lora_weights, use_qalora or megatron_config
                       "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
                       "megatron_core"}),
    "IA3": frozenset({"target_modules", "exclude_modules", "feedforward_modules", "init_ia3_weights"}),
    # the sizes are checked against the tensor and the model; the tokenizer only ever served PEFT's TEXT init
    "PROMPT_TUNING": frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                "num_attention_heads", "num_layers", "prompt_tuning_init", "prompt_tuning_init_text",
                                "tokenizer_name_or_path", "tokenizer_kwargs"}),
    # encoder_hidden_size and init_weights shape only the training-time projection and init; the file holds
    # the prefixes they produced (PEFT saves projected prefixes too, whatever prefix_projection says)
    "PREFIX_TUNING": frozenset({"num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                                "num_transformer_submodules", "prefix_projection", "encoder_hidden_size",
                                "init_weights"}),
}
# PEFT options leantune has no equivalent for, each at the value where it changes nothing. Any other
# key is unknown to import_peft and must be empty (null, false, [], {}, "").
PEFT_NEUTRAL_OPTIONS = {
    "LORA": {"bias": "none", "modules_to_save": None, "lora_bias": False,
             "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "use_qalora": False,
             "megatron_config": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
             "target_parameters": None, "ensure_weight_tying": False, "velora_config": None,
             "monteclora_config": None, "kasa_config": None, "use_bdlora": None, "arrow_config": None},
    "IA3": {"modules_to_save": None},
    "PROMPT_TUNING": {"modules_to_save": None},
    "PREFIX_TUNING": {"modules_to_save": None},
}
# init_lora_weights values (lower-cased) whose init leaves the base weights alone: the saved factors are the
# whole adapter.
BASE_KEEPING_INITS = ("true", "false", "gaussian", "orthogonal", "eva", "mica")
# Inits that subtract the initial adapter from the base weights (pissa also as pissa_niter_<n>); PEFT redoes
# that on load from the base it is given, import_peft does not.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga")
SELECTION_KEYS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def import_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Attach the Hugging Face PEFT adapter (LoRA, DoRA, IA3, prompt or prefix tuning) in directory `path` to `model`."""
    path = Path(path)
    document = _read_peft_config(path)
    source = path / PEFT_CONFIG_FILE
    peft_type = document["peft_type"]
    # checked before the tensors are read: other prompt-learning files hold no per-module tensors
    if not isinstance(peft_type, str) or peft_type not in PEFT_READ_KEYS:
        raise LeantuneError(f"'{path}' holds a PEFT adapter of type {peft_type!r}, which import_peft does not support "
                            "yet (it imports LORA, with or without use_dora, IA3, PROMPT_TUNING and PREFIX_TUNING)")
    _refuse_unsupported(document, source, PEFT_READ_KEYS[peft_type], PEFT_NEUTRAL_OPTIONS[peft_type])
    if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING"):  # one tensor for the whole model, not keyed by module
        tensors = load_tensors(path / PEFT_TENSOR_FILE)
        if peft_type == "PROMPT_TUNING":
            config, state = _prompt_tuning_import(document, source, tensors)
        else:
            config, state = _prefix_import(model, document, tensors, source)
        return attach_with_state(model, config, adapter_name, state)
    if peft_type == "LORA":
        _refuse_base_rewriting_init(document.get("init_lora_weights", True), source)
    tensors = _read_peft_tensors(path)
    importer = _lora_import if peft_type == "LORA" else _ia3_import
    config, state = importer(model, document, tensors)
    _check_config_selects(model, document, source, {key.rpartition(".")[0] for key in state})
    return attach_with_state(model, config, adapter_name, state)


def _read_peft_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise LeantuneError(f"PEFT adapter directory '{path}' does not exist")
    config_path, tensor_path = path / PEFT_CONFIG_FILE, path / PEFT_TENSOR_FILE
    if not tensor_path.is_file():
        if (path / PEFT_PICKLE_FILE).is_file():
            raise LeantuneError(f"'{path}' holds {PEFT_PICKLE_FILE}, a pickle that leantune never loads; re-save the "
                                "adapter with PEFT's save_pretrained(..., safe_serialization=True)")
        raise LeantuneError(f"'{path}' is not a PEFT adapter: {PEFT_TENSOR_FILE} is missing")
    if not config_path.is_file():
        raise LeantuneError(f"'{path}' is not a PEFT adapter: {PEFT_CONFIG_FILE} is missing")
    document = read_json_file(config_path)
    if not isinstance(document, dict) or "peft_type" not in document:
        raise LeantuneError(f"'{config_path}' is not a PEFT adapter config (no peft_type)")
    return document


def _read_peft_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, tensor in load_tensors(path / PEFT_TENSOR_FILE).items():
        if not key.startswith(PEFT_PREFIX):
            raise LeantuneError(f"PEFT tensor '{key}' does not start with '{PEFT_PREFIX}'")
        tensors[key[len(PEFT_PREFIX):]] = tensor
    return tensors


def _is_empty(value: Any) -> bool:
    return value is None or value is False or value in ([], {}, "")


def _refuse_unsupported(document: dict[str, Any], source: Path, read: frozenset[str],
                        neutral_options: dict[str, Any]) -> None:
    """Every PEFT option import_peft does not read must be at its neutral value; unknown ones must be empty."""
    for key, value in document.items():
        if key in PEFT_METADATA_KEYS or key in read:
            continue
        neutral = neutral_options.get(key)
        if value == neutral or (_is_empty(value) and _is_empty(neutral)):
            continue
        if key in neutral_options:
            raise LeantuneError(f"PEFT option {key}={value!r} in '{source}' is not supported by import_peft "
                                f"(only {neutral!r})")
        raise LeantuneError(f"PEFT option {key}={value!r} in '{source}' is unknown to import_peft, which therefore "
                            "cannot tell whether it changes what the adapter computes")


def _refuse_base_rewriting_init(init: Any, source: Path) -> None:
    """The saved factors must apply to the original base: some inits move part of the base into them."""
    kind = str(init).lower()
    if kind in BASE_KEEPING_INITS:
        return
    if kind.startswith(BASE_REWRITING_INITS):
        raise LeantuneError(
            f"'{source}' has init_lora_weights={init!r}, an init that rewrites the base weights, so its factors do "
            "not apply to the original base; re-save it as a plain LoRA adapter for the original base with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved right after init>)")
    if kind == "loftq":
        raise LeantuneError(
            f"'{source}' has init_lora_weights='loftq', so its factors apply to the quantized residual LoftQ makes "
            "of the base weights, which import_peft cannot rebuild; merge it into its base with PEFT "
            "(merge_and_unload) and load the merged model instead")
    raise LeantuneError(f"'{source}' has init_lora_weights={init!r}, which import_peft does not know, so it cannot "
                        f"tell whether the init rewrote the base (known: {', '.join(BASE_KEEPING_INITS)})")


def _split_keys(tensors: dict[str, torch.Tensor], suffixes: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {leantune name: tensor}} from PEFT keys '<module><suffix>'."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix, local in suffixes.items():
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[local] = tensor
                break
        else:
            raise LeantuneError(f"PEFT tensor '{PEFT_PREFIX}{key}' is not one leantune knows how to import")
    return modules


def _lora_import(model: nn.Module, document: dict[str, Any],
                 tensors: dict[str, torch.Tensor]) -> tuple[MethodConfig, dict[str, torch.Tensor]]:
    use_dora = bool(document.get("use_dora", False))
    suffixes = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"}
    if use_dora:
        suffixes[".lora_magnitude_vector"] = "magnitude"
    modules = _split_keys(tensors, suffixes)
    cls = DoRA if use_dora else LoRA
    try:
        fields = {"r": document["r"], "alpha": document["lora_alpha"]}
    except KeyError as err:
        raise LeantuneError(f"PEFT LoRA config lacks {err.args[0]!r}") from None
    config = cls(**fields, dropout=float(document.get("lora_dropout") or 0.0),
                 rslora=bool(document.get("use_rslora", False)),
                 targets=_targets_for(model, cls, list(modules), document.get("target_modules")))
    return config, _flatten(modules)


def _ia3_import(model: nn.Module, document: dict[str, Any],
                tensors: dict[str, torch.Tensor]) -> tuple[MethodConfig, dict[str, torch.Tensor]]:
    modules = _split_keys(tensors, {".ia3_l": "ia3_l"})
    names = list(modules)
    hint = document.get("feedforward_modules") or []
    if isinstance(hint, str):  # PEFT reads a string as a regex over the full module name
        feedforward = [n for n in names if _peft_regex(hint, "feedforward_modules").fullmatch(n)]
        hint = feedforward
    else:
        # PEFT marks a module as feed-forward when its name ends with a feedforward_modules entry.
        feedforward = [n for n in names if any(n.endswith(entry) for entry in hint)]
    ours = {n for n in names if any(n == e or n.endswith("." + e) for e in hint)}
    if ours != set(feedforward) or not all(any(n == e or n.endswith("." + e) for n in names) for e in hint):
        hint = feedforward  # the short names would not select the same modules in leantune: use full names
    for parts in modules.values():
        parts["ia3_l"] = parts["ia3_l"].reshape(-1)
    config = IA3(targets=_targets_for(model, IA3, names, document.get("target_modules"), feedforward=hint),
                 feedforward=hint)
    return config, _flatten(modules)


def _prompt_tuning_import(document: dict[str, Any], source: Path,
                          tensors: dict[str, torch.Tensor]) -> tuple[MethodConfig, dict[str, torch.Tensor]]:
    """PEFT's one `prompt_embeddings` table, prepended to a causal LM's decoder input (the shape is checked
    against the model when the tensor is loaded)."""
    if document.get("task_type") != "CAUSAL_LM":
        raise LeantuneError(f"'{source}' has task_type={document.get('task_type')!r}; import_peft reads prompt tuning "
                            "for causal LMs only (task_type 'CAUSAL_LM')")
    if document.get("num_transformer_submodules") not in (None, 1):
        raise LeantuneError(f"'{source}' has num_transformer_submodules={document['num_transformer_submodules']!r}; "
                            "a causal LM's prompt goes in front of one decoder (1)")
    if set(tensors) != {"prompt_embeddings"}:
        other = sorted(set(tensors) - {"prompt_embeddings"}) or ["(none)"]
        raise LeantuneError(f"'{source.parent}' holds tensor '{other[0]}'; a PEFT prompt-tuning adapter holds exactly "
                            "one, 'prompt_embeddings'")
    inits = {peft: ours for ours, peft in PEFT_PROMPT_INITS.items()}
    peft_init = str(document.get("prompt_tuning_init") or "RANDOM").upper()
    if peft_init not in inits:
        raise LeantuneError(f"'{source}' has prompt_tuning_init={document.get('prompt_tuning_init')!r}, which import_peft "
                            f"does not know (known: {', '.join(inits)})")
    if "num_virtual_tokens" not in document:
        raise LeantuneError(f"PEFT prompt-tuning config '{source}' lacks 'num_virtual_tokens'")
    init = inits[peft_init]
    config = PromptTuning(num_virtual_tokens=document["num_virtual_tokens"], init=init,
                          init_text=document.get("prompt_tuning_init_text") if init == "text" else None)
    return config, {"prompt_embeddings": tensors["prompt_embeddings"]}


def _prefix_import(model: nn.Module, document: dict[str, Any], tensors: dict[str, torch.Tensor],
                   source: Path) -> tuple[MethodConfig, dict[str, torch.Tensor]]:
    try:
        config = PrefixTuning(num_virtual_tokens=document["num_virtual_tokens"])
    except KeyError as err:
        raise LeantuneError(f"PEFT prefix-tuning config '{source}' lacks {err.args[0]!r}") from None
    shape = prefix_shape(model, config.num_virtual_tokens)
    expected = {"num_layers": shape.layers, "num_attention_heads": shape.kv_heads, "token_dim": shape.width,
                "num_transformer_submodules": 1}
    for key, value in expected.items():
        if document.get(key) != value:
            raise LeantuneError(f"PEFT {key}={document.get(key)!r} in '{source}' does not fit this "
                                f"{type(model).__name__}, whose key/value prefixes need {key}={value}")
    if set(tensors) != {"prompt_embeddings"}:
        raise LeantuneError(f"'{source.parent}' holds tensors {', '.join(sorted(tensors))}; a PEFT prefix-tuning "
                            "adapter holds exactly one, 'prompt_embeddings'")
    flat = tensors["prompt_embeddings"]
    want = (shape.virtual, shape.layers * 2 * shape.width)
    if tuple(flat.shape) != want:
        raise LeantuneError(f"PEFT tensor 'prompt_embeddings' in '{source.parent}' has shape {tuple(flat.shape)}, "
                            f"its config asks for {want}")
    keys, values = prefix_from_peft(flat, shape.layers, shape.kv_heads)
    return config, {KEYS: keys, VALUES: values}


def prefix_from_peft(flat: torch.Tensor, layers: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (virtual, layers · 2 · kv_heads · head_dim) -> keys and values, each (layers, kv_heads, virtual,
    head_dim): the inverse of peft_export.prefix_to_peft."""
    virtual = flat.shape[0]
    both = flat.reshape(virtual, layers, 2, kv_heads, -1).permute(1, 2, 3, 0, 4)
    return both[:, 0].contiguous(), both[:, 1].contiguous()


def _targets_for(model: nn.Module, cls: type[MethodConfig], names: list[str], hint: Any, **fields: Any) -> list[str] | str:
    """PEFT's own target_modules when they select exactly the modules in the file; else the full names."""
    if isinstance(hint, (str, list)) and hint:
        try:
            chosen = [n for n, _ in resolve_targets(model, cls(targets=hint, **fields))]
        except LeantuneError:
            chosen = None
        if chosen is not None and set(chosen) == set(names):
            return hint
    return names


def _flatten(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{module}.{local}": tensor for module, parts in modules.items() for local, tensor in parts.items()}


# -- which modules a PEFT config selects ----------------------------------------------------

def _check_config_selects(model: nn.Module, document: dict[str, Any], source: Path, modules: set[str]) -> None:
    """The adapter's tensors must sit on modules its own config selects. PEFT refuses a config that selects
    nothing, and skips tensors outside target_modules / exclude_modules / layers_to_transform without a word;
    leantune refuses both rather than guess which of config and tensors is right."""
    if _is_empty(document.get("target_modules")):  # PEFT would use its per-architecture defaults: tensors decide
        return
    present = {name for name, _ in candidate_modules(model)}
    absent = sorted(modules - present)
    if absent:
        raise LeantuneError(f"'{source.parent}' holds tensors for '{absent[0]}', which this {type(model).__name__} "
                            "has no module for (was the adapter made for another model?)")
    selected = _peft_selection(model, document, source)
    settings = ", ".join(f"{key}={document[key]!r}" for key in SELECTION_KEYS if not _is_empty(document.get(key)))
    if not selected:
        targets = document["target_modules"]
        first = targets if isinstance(targets, str) else targets[0]
        raise LeantuneError(f"PEFT {settings} in '{source}' select no module of this {type(model).__name__} "
                            f"(PEFT refuses such an adapter too); {closest_names(candidate_modules(model), first)}")
    outside = sorted(modules - selected)
    if outside:
        raise LeantuneError(f"'{source.parent}' holds tensors for '{outside[0]}' ({len(outside)} modules in all) that "
                            f"its config's {settings} leave out and PEFT would skip; remove those tensors or "
                            "correct the config")


def _peft_selection(model: nn.Module, document: dict[str, Any], source: Path) -> set[str]:
    """The modules PEFT's loader adapts under this config's target_modules, exclude_modules and layers_to_transform."""
    targets = _peft_names(document, "target_modules", source)
    excluded = _peft_names(document, "exclude_modules", source)
    layers = _peft_layers(document, source)
    heads = output_head_names(model)
    selected = set()
    for name, module in candidate_modules(model):
        if excluded and _peft_name_matches(excluded, name, "exclude_modules"):
            continue
        if targets == ALL_LINEAR:
            hit = isinstance(unwrap(module), nn.Linear) and name not in heads and _in_peft_layers(layers, document, name)
        elif isinstance(targets, str):
            hit = _peft_name_matches(targets, name, "target_modules")
        else:  # a full name is taken as it is; a short one also has to pass the layer filter
            hit = name in targets or (_peft_name_matches(targets, name, "target_modules")
                                      and _in_peft_layers(layers, document, name))
        if hit:
            selected.add(name)
    return selected


def _peft_names(document: dict[str, Any], key: str, source: Path) -> str | list[str] | None:
    value = document.get(key)
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise LeantuneError(f"PEFT {key}={value!r} in '{source}' must be a regex or a list of module names")


def _peft_layers(document: dict[str, Any], source: Path) -> list[int] | None:
    value = document.get("layers_to_transform")
    if value is None or value == []:
        return None
    layers = [value] if isinstance(value, int) else value
    if isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        return layers
    raise LeantuneError(f"PEFT layers_to_transform={value!r} in '{source}' must be a layer index or a list of them")


def _peft_name_matches(entries: str | list[str], name: str, key: str) -> bool:
    """PEFT's module-name test: a string is a regex over the full name; a list entry is the name or its ending."""
    if isinstance(entries, str):
        return _peft_regex(entries, key).fullmatch(name) is not None
    return name in entries or any(name.endswith("." + entry) for entry in entries)


def _in_peft_layers(layers: list[int] | None, document: dict[str, Any], name: str) -> bool:
    if layers is None:
        return True
    index = _peft_layer_index(name, document.get("layers_pattern"))
    return index is not None and index in layers


def _peft_layer_index(name: str, patterns: str | list[str] | None) -> int | None:
    """The block index as PEFT reads it: the number after the first module list a layers_pattern entry names,
    or without one, the first all-digit component from the third on that is not the last ('model.layers.3.mlp')."""
    if not patterns:
        return next((int(part) for part in name.split(".")[2:-1] if part.isdecimal()), None)
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        match = re.search(rf"(?:^|\.)(?:{_peft_regex(pattern, 'layers_pattern').pattern})\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def _peft_regex(pattern: str, key: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise LeantuneError(f"PEFT {key} regex {pattern!r} is invalid: {err}") from None
