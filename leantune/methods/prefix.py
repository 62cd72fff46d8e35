"""Prefix tuning: trainable keys and values that every attention layer sees before the real tokens.

Each layer gets `num_virtual_tokens` key/value pairs of its key/value heads' shape (kv_heads ×
virtual × head_dim, so grouped-query models get prefixes as narrow as their cache). They reach the
attention through the model's own cache, by its public API only (a `transformers.DynamicCache`,
`update`, `get_seq_length`): a forward pre-hook on the decoder hands a call that brings no cache,
or an empty one, a cache already holding the prefixes (batch-expanded), and on every call extends
a 2-D attention mask by as many ones in front and moves explicit position ids past the prefix.
Without position ids the model counts from the cache's length itself, so either way the real
tokens sit at positions virtual, virtual + 1, ... as after any cached context (PEFT places them
there too). Later generation steps bring the cache back with the prefixes already in it, so only
the mask and positions move. A call that asked for no cache gets none back: the attention reads
the prefix cache whatever `use_cache` says, but `generate(use_cache=False)` must not be handed it
for the next step.

Init: "vocab" (the default for plain prefixes: random vocabulary tokens drawn from `seed`) and
"text" (`init_text`'s tokens) run the model once on those tokens and start from the keys and values
its layers cache for them, the prefix-tuning paper's initialisation from real words: the prefixes
begin at the scale of the model's own, and the adapted model starts as the base reading those tokens
first. "random" (the default with `reparam_hidden`, whose MLP makes the prefixes) draws every key
and value, or the MLP's input, from a standard normal, as PEFT's prefix embedding starts, far from
the model's scale (on SmolLM2-135M eval loss 5.75 before training against the base's 0.95, and 1.64
after the demo job's budget at the best rate against 0.69 from "vocab":
benchmarks/results/2026-12-02-lr-grid/).

With `reparam_hidden`, training produces the prefixes through the prefix-tuning paper's
reparameterisation (an embedding per virtual token → Linear → tanh → Linear). What is saved is
only the prefixes it yields, and a loaded adapter holds them as plain tensors. Prefixes are extra
attention context, not a weight update, so the method is not mergeable.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.utils import ModelOutput

from ..errors import LeantuneError
from .base import ModelMethod, register
from .layer import Router, adapter_dtype, model_router
from .token_init import init_token_ids, validate_init

ENCODER_ATTR = "leantune_prefix"  # the model's submodule that holds the prefixes
KEYS, VALUES = "prefix.keys", "prefix.values"  # saved tensors, each (layers, kv_heads, virtual, head_dim)
CACHE_ARGUMENTS = ("cache", "past_key_values")  # the decoder's cache argument, newest name first


@dataclass(frozen=True)
class PrefixShape:
    layers: int
    kv_heads: int
    virtual: int
    head_dim: int

    @property
    def per_layer(self) -> tuple[int, int, int]:
        return self.kv_heads, self.virtual, self.head_dim

    @property
    def width(self) -> int:
        """One virtual token's key (or value) in one layer, all heads side by side."""
        return self.kv_heads * self.head_dim


@register
@dataclass
class PrefixTuning(ModelMethod):
    method_name: ClassVar[str] = "prefix"
    mergeable: ClassVar[bool] = False

    num_virtual_tokens: int = 20
    reparam_hidden: int | None = None
    init: str | None = None  # None: "vocab", or "random" with reparam_hidden (see starting_init)
    init_text: str | None = None
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        self._require_int("num_virtual_tokens")
        if self.reparam_hidden is not None:
            self._require_int("reparam_hidden")
        validate_init(self.method_name, self.starting_init, self.init_text)
        self._require_int("seed", minimum=0)
        if self.reparam_hidden is not None and self.starting_init != "random":
            raise LeantuneError(f"prefix: init={self.init!r} starts plain prefixes, and with 'reparam_hidden' an MLP "
                                "makes them; set init: random with reparam_hidden")

    @property
    def starting_init(self) -> str:
        """`init`, or its default: from vocabulary tokens, unless an MLP makes the prefixes."""
        if self.init is not None:
            return self.init
        return "random" if self.reparam_hidden is not None else "vocab"

    def for_saved_tensors(self) -> "PrefixTuning":
        return replace(self, init="random", init_text=None)  # no forward pass, no tokenizer

    def attach_to_model(self, model: nn.Module, adapter_name: str) -> list[str]:
        if ENCODER_ATTR in model._modules:
            raise LeantuneError("the model already has a prefix-tuning adapter; detach it before attaching another")
        decoder = decoder_of(model)
        cache_argument = cache_argument_of(decoder)
        shape = prefix_shape(model, self.num_virtual_tokens)
        weight = decoder.get_input_embeddings().weight
        encoder = PrefixEncoder(shape, self.reparam_hidden, adapter_dtype(weight), weight.device)
        if self.starting_init != "random":
            ids = init_token_ids(self.method_name, self.starting_init, self.init_text, shape.virtual, self.seed, model,
                                 weight.shape[0])
            encoder.start_from(*cached_keys_and_values(decoder, cache_argument, ids.to(weight.device), shape))
        model.add_module(ENCODER_ATTR, encoder.train(model.training))
        encoder.hook_into(decoder, model_router(model), adapter_name, cache_argument)
        return []

    def detach_from_model(self, model: nn.Module, adapter_name: str) -> None:
        encoder_of(model).unhook()
        delattr(model, ENCODER_ATTR)

    def trainable_parameters(self, model: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
        yield from encoder_of(model).parameters()

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        encoder = encoder_of(model)
        if encoder.reparameterised:
            with torch.no_grad():
                keys, values = encoder.prefixes()
            return {KEYS: keys, VALUES: values}
        return {KEYS: encoder.keys, VALUES: encoder.values}

    def load_state_dict(self, model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
        encoder_of(model).fold()  # the saved prefixes are what runs from now on
        super().load_state_dict(model, adapter_name, state)

    def training_state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor] | None:
        """With reparam_hidden: the embedding and MLP that make the prefixes (the adapter saves their output)."""
        encoder = encoder_of(model)
        return dict(encoder.named_parameters()) if encoder.reparameterised else None


def encoder_of(model: nn.Module) -> "PrefixEncoder":
    return model._modules[ENCODER_ATTR]


# -- what the model must offer ----------------------------------------------------------------

def text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "get_text_config", None)):
        raise LeantuneError(f"prefix tuning needs a Hugging Face transformers model; {type(model).__name__} has no config")
    return config.get_text_config(decoder=True)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder body (the module leantune's chunked loss calls directly, so the hook sits there)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if not isinstance(decoder, nn.Module):
        raise LeantuneError(f"prefix tuning needs a Hugging Face decoder model (with get_decoder); "
                            f"{type(model).__name__} has none")
    return decoder


def cache_argument_of(decoder: nn.Module) -> str:
    parameters = inspect.signature(decoder.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in parameters:
            return name
    raise LeantuneError(f"prefix tuning feeds its prefixes through the attention cache, and {type(decoder).__name__} "
                        "takes no cache")


def prefix_shape(model: nn.Module, num_virtual_tokens: int) -> PrefixShape:
    """Layers, key/value heads and head size from the model config (grouped-query models cache fewer heads)."""
    config = text_config(model)
    if getattr(config, "is_encoder_decoder", False):
        raise LeantuneError(f"prefix tuning supports decoder-only models; {type(model).__name__} is an encoder-decoder")
    kinds = sorted(set(getattr(config, "layer_types", None) or ["full_attention"]) - {"full_attention"})
    if kinds:
        raise LeantuneError(f"prefix tuning needs full attention in every layer; this {config.model_type} model also "
                            f"has {', '.join(kinds)} layers")
    try:
        layers, heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    except AttributeError as err:
        raise LeantuneError(f"prefix tuning cannot read the attention shape of this model: its config lacks "
                            f"{err.name!r}") from None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return PrefixShape(layers, kv_heads, num_virtual_tokens, head_dim)


def cached_keys_and_values(decoder: nn.Module, cache_argument: str, ids: torch.Tensor,
                           shape: PrefixShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's keys and values for `ids` at positions 0.., as the attention hands them to its cache.

    Read through the cache's public `update` (what every attention layer calls), not its storage,
    whose layout changes between transformers versions."""
    cache, seen = DynamicCache(), {}
    update = cache.update

    def recording_update(keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        seen[layer_idx] = (keys[0].detach(), values[0].detach())
        return update(keys, values, layer_idx, *args, **kwargs)

    cache.update = recording_update
    was_training = decoder.training
    try:
        with torch.no_grad():
            decoder.eval()  # no dropout in the starting values
            decoder(input_ids=ids[None], use_cache=True, **{cache_argument: cache})
    finally:
        decoder.train(was_training)
    if sorted(seen) != list(range(shape.layers)):
        raise LeantuneError(f"prefix: init from tokens saw cache entries for {len(seen)} of the model's {shape.layers} "
                            "layers; use init='random'")
    keys, values = (torch.stack([seen[layer][part] for layer in range(shape.layers)]) for part in (0, 1))
    if keys.shape != (shape.layers, *shape.per_layer) or values.shape != keys.shape:
        raise LeantuneError(f"prefix: the model caches keys of shape {tuple(keys.shape[1:])} per layer, not the "
                            f"{shape.per_layer} its config describes; use init='random'")
    return keys, values


def uses_gradient_checkpointing(decoder: nn.Module) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) is True for module in decoder.modules())


# -- the prefixes and the hooks that feed them ------------------------------------------------

class PrefixEncoder(nn.Module):
    """One adapter's prefixes, plain or reparameterised, and the decoder hooks that put them in front."""

    adapter_owned: ClassVar[bool] = True  # not part of the model: no module method targets its linears

    def __init__(self, shape: PrefixShape, reparam_hidden: int | None, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.shape = shape
        self.reparameterised = reparam_hidden is not None
        factory = {"dtype": dtype, "device": device}
        # Standard normal starts, as PEFT's prefix embedding starts, so the two begin alike.
        if self.reparameterised:
            self.embedding = nn.Parameter(torch.randn(shape.virtual, shape.width, **factory))
            self.mlp_in = nn.Linear(shape.width, reparam_hidden, **factory)
            self.mlp_out = nn.Linear(reparam_hidden, shape.layers * 2 * shape.width, **factory)
        else:
            self.keys = nn.Parameter(torch.randn(shape.layers, *shape.per_layer, **factory))
            self.values = nn.Parameter(torch.randn(shape.layers, *shape.per_layer, **factory))
        self.handles: list[Any] = []
        self.internal_cache: DynamicCache | None = None  # the cache of a call that asked for none

    def start_from(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.keys.copy_(keys)
            self.values.copy_(values)

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, each (layers, kv_heads, virtual, head_dim)."""
        if not self.reparameterised:
            return self.keys, self.values
        s = self.shape
        flat = self.mlp_out(torch.tanh(self.mlp_in(self.embedding)))  # (virtual, layers · 2 · width)
        both = flat.view(s.virtual, s.layers, 2, s.kv_heads, s.head_dim).permute(1, 2, 3, 0, 4)
        return both[:, 0], both[:, 1]

    def fold(self) -> None:
        """Replace the reparameterisation by the plain prefixes it produces now."""
        if not self.reparameterised:
            return
        with torch.no_grad():
            keys, values = (t.detach().clone() for t in self.prefixes())
        del self.embedding, self.mlp_in, self.mlp_out
        self.keys, self.values = nn.Parameter(keys), nn.Parameter(values)
        self.reparameterised = False

    # -- hooks ------------------------------------------------------------------------------
    def hook_into(self, decoder: nn.Module, router: Router, adapter_name: str, cache_argument: str) -> None:
        # Bound-method hooks: a deep copy of the model gets hooks that read the copy's prefixes and router.
        self.router, self.adapter_name, self.cache_argument = router, adapter_name, cache_argument
        self.handles = [decoder.register_forward_pre_hook(self.before_decoder, with_kwargs=True),
                        decoder.register_forward_hook(self.after_decoder, with_kwargs=True)]

    def unhook(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def before_decoder(self, decoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.internal_cache = None
        if not self.router.runs(self.adapter_name):
            return None
        if len(args) > 1:
            raise LeantuneError("prefix tuning needs the decoder's attention_mask, position_ids and cache passed by "
                                "keyword, not by position")
        if decoder.training and torch.is_grad_enabled() and uses_gradient_checkpointing(decoder):
            raise LeantuneError("prefix tuning cannot train with gradient checkpointing: checkpointed layers drop the "
                                "attention cache that carries the prefixes; turn gradient_checkpointing off")
        cache = self._incoming_cache(kwargs)
        if cache is None or cache.get_seq_length() == 0:
            cache = self._cache_with_prefixes(decoder, cache, args, kwargs)
        kwargs[self.cache_argument] = cache
        kwargs["attention_mask"] = self._extended_mask(kwargs.get("attention_mask"))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.shape.virtual
        return args, kwargs

    def after_decoder(self, decoder: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        internal, self.internal_cache = self.internal_cache, None
        if internal is None or not isinstance(output, ModelOutput):
            return None
        return type(output)(**{key: value for key, value in output.items() if value is not internal})

    def _incoming_cache(self, kwargs: dict) -> Any:
        caches = [kwargs.pop(name, None) for name in CACHE_ARGUMENTS]
        return next((cache for cache in caches if cache is not None), None)

    def _cache_with_prefixes(self, decoder: nn.Module, cache: Any, args: tuple, kwargs: dict) -> Any:
        """`cache` (empty) or a new DynamicCache, holding every layer's prefixes for the batch."""
        if cache is None:
            cache = DynamicCache()  # one full-attention layer per decoder layer, made as they fill
            use_cache = kwargs.get("use_cache")
            if use_cache is None:  # the model's own default, as transformers reads it
                use_cache = getattr(getattr(decoder, "config", None), "use_cache", False)
            if not use_cache:
                self.internal_cache = cache
        inputs = args[0] if args else kwargs.get("input_ids")
        batch = (inputs if inputs is not None else kwargs["inputs_embeds"]).shape[0]
        dtype = self._compute_dtype(decoder)
        keys, values = self.prefixes()
        per_layer = (batch, *self.shape.per_layer)
        for layer in range(self.shape.layers):
            cache.update(keys[layer].to(dtype).expand(per_layer), values[layer].to(dtype).expand(per_layer), layer)
        return cache

    def _compute_dtype(self, decoder: nn.Module) -> torch.dtype:
        """The dtype of the keys the layers add next to the prefixes: autocast's when active, else the model's."""
        weight = decoder.get_input_embeddings().weight
        if torch.is_autocast_enabled(weight.device.type):
            return torch.get_autocast_dtype(weight.device.type)
        return weight.dtype

    def _extended_mask(self, mask: Any) -> Any:
        if mask is None:
            return None  # the causal mask then covers the whole cache, prefixes included
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            kind = f"{mask.dim()}-D" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise LeantuneError("prefix tuning extends 2-D attention masks (batch × tokens) only; this call passed a "
                                f"{kind} mask")
        return torch.cat([mask.new_ones(mask.shape[0], self.shape.virtual), mask], dim=1)
