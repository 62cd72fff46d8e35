"""AdapterLayer: the wrapper every module method puts around a targeted module, the router that
decides per forward which adapters run, and the small weight helpers layers share."""
from __future__ import annotations

import contextlib
from typing import ClassVar, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ..errors import LeantuneError
from .rows import RowForm, routed_forward


PART_SEPARATOR = "/"  # "name/0": part 0 of the hybrid adapter "name" (methods/hybrid.py)


def owner_name(adapter_name: str) -> str:
    """The adapter a layer belongs to: itself, or the hybrid adapter whose part it is."""
    return adapter_name.partition(PART_SEPARATOR)[0]


class Router:
    """Which adapters a forward of one model runs; one per model, read by all of its adapter layers
    (and by the forward hooks of model methods, such as prompt tuning's).

    `selected` is what `lt.use` chose (None: every attached adapter, stacked); `switched_off` holds
    the adapters an enclosing `lt.disabled` block turned off; `rows`, while set, gives each batch
    row its own adapter (`methods/rows.py`). The decision lives here, once, so a layer never keeps
    an on/off flag of its own."""

    def __init__(self) -> None:
        self.selected: frozenset[str] | None = None
        self.switched_off: set[str] = set()
        self.rows: tuple[str | None, ...] | None = None  # one adapter per batch row (adapter_names=); None: off
        self.trust_versions = False  # rows: adapters change only by attach/detach (the server; methods/rows.py)
        # Bumped whenever adapter layers are wrapped, unwrapped, merged or unmerged: under trust_versions
        # a module's stacked row forms stay valid while it holds (methods/rows.py).
        self.layout = 0

    def runs(self, adapter_name: str) -> bool:
        adapter_name = owner_name(adapter_name)
        if adapter_name in self.switched_off:
            return False
        return self.selected is None or adapter_name in self.selected

    def select(self, names: Iterable[str] | None) -> None:
        self.selected = None if names is None else frozenset(names)


_ROUTER_ATTR = "leantune_router"


def model_router(model: nn.Module) -> Router:
    """The model's router (kept in its __dict__, outside parameters and state_dict): adapter layers
    read it through `api.bind_layers`, model methods' hooks ask it directly."""
    return model.__dict__.setdefault(_ROUTER_ATTR, Router())


class AdapterLayer(nn.Module):
    """Wraps one module of the base model.

    Subclasses implement `adapted_forward` and, if they can be merged, `merge_into_base` plus
    `merged_base_tensors` (names of base_layer tensors that merging changes). Unmerge restores a
    stored copy of exactly those tensors, so it never drifts.
    """

    method_name: ClassVar[str] = ""  # the config's name, for messages (users know methods, not layer classes)
    # Whether clean_weight() first undoes in-place edits of the base weight that a plain forward
    # made (PaCA's columns): routed forwards then call it even when their cached forms are trusted.
    cleans_base_in_place: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module, adapter_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_name = adapter_name
        self.merged = False
        self.router = Router()  # the model's own router replaces this one at attach (api.bind_layers)
        self._merge_backup: dict[str, torch.Tensor] = {}

    @property
    def disabled(self) -> bool:
        """Whether this forward runs without this adapter (the model's router decides)."""
        return not self.router.runs(self.adapter_name)

    # Module attributes code often reads (in_features, weight...) come from the wrapped module.
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_module(self) -> nn.Module:
        """The innermost original module (adapters may be stacked under different names)."""
        module = self.base_layer
        while isinstance(module, AdapterLayer):
            module = module.base_layer
        return module

    # -- forward --------------------------------------------------------------------------
    # Eager inside a compiled block (`compile: true`, or a user's torch.compile): routing and PaCA's
    # in-place column writes are Python state a graph would guard on and recompile for, per layer.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.router.rows is not None:
            router = self.router
            return routed_forward(self, x, router.rows, router.layout if router.trust_versions else None)
        if self.disabled:
            return self.disabled_forward(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def disabled_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Exactly the original module; layers that edit base weights in place override this."""
        return _first_running(self.base_layer)(x, *args, **kwargs)

    def passes_input_on_when_off(self) -> bool:
        """Whether this layer, switched off, only calls the module it wraps with the same arguments."""
        return runs_default_off_path(self, AdapterLayer)

    # -- one adapter per batch row (methods/rows.py) -----------------------------------------
    def row_form(self) -> RowForm:
        """This adapter's update in the row form; methods that have none are refused by name."""
        raise LeantuneError(f"{self.method_name} adapters cannot run one per batch row (adapter_names=); "
                            "that works for lora, dora, ia3 and paca. Run this adapter alone (lt.use), or serve "
                            "its merged export")

    def clean_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The base weight without any adapter's contribution (`weight`: what the layers below gave)."""
        return dense_weight(self.base_module()) if weight is None else weight

    def effective_weight(self) -> torch.Tensor | None:
        """The dense W with this layer's output = x Wᵀ + b as the layer runs now (its own update
        applied when it runs and is not merged), or None where it is no single linear map. DoRA
        stacked on top normalises this weight, as its merge does."""
        below = (self.base_layer.effective_weight() if isinstance(self.base_layer, AdapterLayer)
                 else dense_weight(self.base_layer))
        if below is None or self.disabled or self.merged:
            return below
        return self.weight_with_update(below)

    def weight_with_update(self, below: torch.Tensor) -> torch.Tensor | None:
        """`below` (the dense weight of what this layer wraps) with this layer's update; None: not linear."""
        return None

    def routing_name(self) -> str:
        return owner_name(self.adapter_name)

    def check_routable(self) -> None:
        if self.merged:
            raise LeantuneError(f"adapter '{self.routing_name()}' is merged into the base weights; lt.unmerge it "
                                "before choosing adapters per row")
        if self.training and (getattr(self, "dropout", 0) > 0 or torch.is_grad_enabled()):
            raise LeantuneError("adapter_names= runs adapters for inference (no dropout, no gradient to the "
                                "adapters); call model.eval() first, or train one adapter per batch")

    def release(self) -> None:
        """Called by `detach` (after unmerge) before the layer is unwrapped: undo in-place base edits."""

    # -- adapter tensors ------------------------------------------------------------------
    # Neither walks into base_layer: under N stacked adapters that made every layer walk the N-1
    # below it, and a routed forward reads every layer's tensors (`rows._sources`).
    def _adapter_children(self) -> Iterator[tuple[str, nn.Module]]:
        return ((name, child) for name, child in self._modules.items() if name != "base_layer" and child is not None)

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.parameters(recurse=False)
        for _, child in self._adapter_children():
            yield from child.parameters()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Own parameters and persistent buffers (never the base layer's)."""
        state: dict[str, torch.Tensor] = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        for name, child in self._adapter_children():
            child.state_dict(destination=state, prefix=f"{name}.", keep_vars=True)
        return state

    def adapter_state_loaded(self) -> None:
        """Hook after `load_state_dict` (e.g. PaCA re-places its columns)."""

    def extra_repr(self) -> str:
        return f"adapter_name={self.adapter_name!r}, merged={self.merged}"

    # -- merge / unmerge ------------------------------------------------------------------
    merged_base_tensors: ClassVar[tuple[str, ...]] = ("weight",)

    def merge_into_base(self) -> None:
        raise LeantuneError(f"{self.method_name} adapters cannot be merged into the base weights")

    def merge(self) -> None:
        if self.merged:
            return
        base = self.base_module()
        self._merge_backup = {
            name: getattr(base, name).detach().clone() for name in self.merged_base_tensors
            if getattr(base, name, None) is not None
        }
        library_writes_weight(base)
        with torch.no_grad():
            self.merge_into_base()
        library_wrote_weight(base)
        self.merged = True
        self.router.layout += 1

    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.base_module()
        library_writes_weight(base)
        with torch.no_grad():
            for name, saved in self._merge_backup.items():
                getattr(base, name).copy_(saved)
        library_wrote_weight(base)
        self._merge_backup = {}
        self.merged = False
        self.router.layout += 1


# A base linear whose weight PaCA's column ledger keeps account of carries it under this name, so
# that a merge or unmerge of an adapter stacked above (a write of the library's, not the user's)
# is not taken for an outside write (paca_columns.ColumnLedger.adopt_outside_writes).
WEIGHT_WATCHER_ATTR = "leantune_weight_watcher"


def library_writes_weight(module: nn.Module) -> None:
    """Before the library writes `module`'s weight: what was written from outside until now is taken
    in, and the weight holds its originals plus merged contributions, as a merge above expects."""
    watcher = module.__dict__.get(WEIGHT_WATCHER_ATTR)
    if watcher is not None:
        watcher.sync_base()


def library_wrote_weight(module: nn.Module) -> None:
    """After it: the weight as it stands is the library's."""
    watcher = module.__dict__.get(WEIGHT_WATCHER_ATTR)
    if watcher is not None:
        watcher.library_wrote()


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 (float64 for float64 bases); half and quantized bases get float32."""
    return base_weight.dtype if base_weight.dtype in (torch.float32, torch.float64) else torch.float32


def autocast_active(x: torch.Tensor) -> bool:
    """Fused autograd functions assume one dtype throughout; under autocast layers take their plain path."""
    return torch.is_autocast_enabled(x.device.type)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run small CPU ops on one thread (PaCA's O(out × r) column writes, the sketch's column sweep):
    for ops this small a parallel region's hand-offs cost more than they buy, and far more when
    other processes hold the cores. Other devices are left alone."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a base linear as a dense tensor (quantized modules dequantize on demand)."""
    dequantize = getattr(module, "dequantize_weight", None)
    return dequantize() if callable(dequantize) else module.weight


def add_to_weight(module: nn.Module, delta: torch.Tensor) -> None:
    """Merge `delta` into a base linear's weight (quantized modules dequantize, add and requantize)."""
    add = getattr(module, "add_to_weight_", None)
    if callable(add):
        add(delta)
    else:
        module.weight += delta.to(module.weight.dtype)


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite a base linear's weight with a dense tensor (quantized modules requantize it)."""
    quantize = getattr(module, "quantize_", None)
    if callable(quantize):
        quantize(weight)
    else:
        module.weight.copy_(weight.to(module.weight.dtype))


def bare_module_name(name: str) -> str:
    """A module's name as on the unadapted model (an inner adapter's layer sits under `.base_layer`)."""
    return name.replace(".base_layer", "")


def adapter_layers(model: nn.Module, adapter_name: str | None = None) -> Iterator[AdapterLayer]:
    for _, layer in named_adapter_layers(model, adapter_name):
        yield layer


def named_adapter_layers(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, AdapterLayer]]:
    """Adapter layers in pre-order (an outer, later-attached layer comes before the one it wraps).

    `adapter_name` selects one adapter's layers; a hybrid adapter's name selects all of its parts'."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and (adapter_name is None or module.adapter_name == adapter_name
                                                  or owner_name(module.adapter_name) == adapter_name):
            yield name, module


def _first_running(module: nn.Module) -> nn.Module:
    """`module`, or the first module below it that does more than pass its input on.

    A switched-off adapter layer with the default forward and no hooks only calls the module it
    wraps; with one adapter of many selected (`lt.use`), every targeted module would otherwise call
    through each of the others' wrappers (16 attached: 16 module calls per projection instead of 2)."""
    if _global_hooks():
        return module
    while (isinstance(module, AdapterLayer) and module.router.rows is None and module.disabled
           and module.passes_input_on_when_off() and not _hooked(module)):
        module = module.base_layer
    return module


def runs_default_off_path(layer: AdapterLayer, defined_by: type) -> bool:
    """Whether `layer` runs `defined_by`'s forward and disabled_forward, neither replaced on its
    class or on the instance (accelerate's hooks and users' patches replace `forward` there)."""
    return (type(layer).forward is AdapterLayer.forward and type(layer).disabled_forward is defined_by.disabled_forward
            and "forward" not in layer.__dict__ and "disabled_forward" not in layer.__dict__)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    """Hooks registered for every module (`register_module_forward_hook` and kin) see each wrapper call."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)
