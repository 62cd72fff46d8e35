"""The SketchTune method config: where the sketch comes from, and attaching it to a model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

from ...builtin_datasets import HUMANEVAL_TESTS
from ...errors import LeantuneError
from ...models import load_tokenizer
from ..base import ModuleMethod, register
from ..layer import adapter_dtype
from ..targets import replace_module, resolve_targets
from .calib import calibration_ids, source_name
from .fit import FitSettings, fit_sketch
from .layer import SketchedLinear, SketchLayer
from .pack import MAX_BITS, TABLE_DTYPES, Sketch, load_sketch, model_identity

# The fit settings a sketch records besides bits and groups_per_row (calib as an absolute path).
FIT_SETTING_KEYS = ("calib", "samples", "seq_len", "damp", "block_size", "act_order", "kmeans_iters", "table_dtype",
                    "seed")


@register
@dataclass
class SketchTune(ModuleMethod):
    """Fine-tune the per-row tables of a sketched model.

    `sketch="DIR"` uses a sketch written by `leantune sketch`; without it, attaching fits one on the
    fly with the fit settings below (bits ... seed). `sketch_id` is filled in at attach time and
    saved with the adapter, so its tables can only be loaded onto the very same sketch.
    The tables want a learning rate about ten times below LoRA's (3e-4 did best on the demo job,
    where LoRA did best at 3e-3; see benchmarks/sketchtune.md).
    """

    method_name: ClassVar[str] = "sketchtune"

    sketch: str | None = None
    bits: int = 4
    groups_per_row: int = 1
    calib: str = HUMANEVAL_TESTS
    samples: int = 64
    seq_len: int = 512
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    kmeans_iters: int = 15
    table_dtype: str = "float16"
    seed: int = 0
    sketch_id: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.sketch is not None and (not isinstance(self.sketch, str) or not self.sketch):
            raise LeantuneError(f"sketchtune: 'sketch' must be a sketch directory, got {self.sketch!r}")
        self._require_int("bits")
        if self.bits > MAX_BITS:
            raise LeantuneError(f"sketchtune: 'bits' must be <= {MAX_BITS}, got {self.bits!r}")
        self._require_choice("groups_per_row", (1, 2, 4, 8))
        self._require_int("samples")
        self._require_int("seq_len", minimum=2)
        self._require_number("damp", low=0, low_open=True)
        self._require_int("block_size")
        self._require_choice("act_order", (False, True))
        self._require_int("kmeans_iters", minimum=0)
        self._require_choice("table_dtype", tuple(TABLE_DTYPES))
        self._require_int("seed", minimum=0)

    # -- where the sketch comes from ------------------------------------------------------------
    def obtain_sketch(self, model: nn.Module) -> Sketch:
        """Load `sketch` (checking it was fitted on this model), or fit one now.

        A loaded sketch's path is kept absolute and the sketch's fit settings replace this config's
        (calib included, as an absolute path), so a saved adapter records where its sketch is and how
        it was fitted, whatever folder it is loaded from.
        """
        if self.sketch is not None:
            path = self._sketch_path()
            sketch = load_sketch(path)
            if model_identity(model) != sketch.model_id:
                raise LeantuneError(
                    f"sketch '{self.sketch}' was fitted on another model ({sketch.model_name or 'unnamed'}, "
                    f"id {sketch.model_id}); attach it to that model, unadapted and in its original dtype")
            self.sketch = str(path)
        else:
            sketch = self.fit(model)[0]
        self._adopt_fit_settings(sketch)
        return sketch

    def _sketch_path(self) -> Path:
        """`sketch` resolved against the current folder; for saved tables, a missing one is named here."""
        path = Path(self.sketch).expanduser()
        if self.sketch_id is not None and not path.is_dir():
            where = "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"
            raise LeantuneError(f"sketch '{self.sketch}'{where}, which these tables were trained on, does not exist; "
                                "put that sketch back where it was")
        return path.resolve()

    def _adopt_fit_settings(self, sketch: Sketch) -> None:
        self.bits, self.groups_per_row = sketch.bits, sketch.groups_per_row
        for key in FIT_SETTING_KEYS:
            if key in sketch.settings:  # sketches written before a setting was recorded keep the default
                setattr(self, key, sketch.settings[key])

    def fit_settings(self) -> FitSettings:
        return FitSettings(bits=self.bits, groups_per_row=self.groups_per_row, damp=self.damp,
                           block_size=self.block_size, act_order=self.act_order, kmeans_iters=self.kmeans_iters,
                           table_dtype=TABLE_DTYPES[self.table_dtype])

    def fit(self, model: nn.Module, tokenizer=None, progress=None):
        """Fit a sketch of the targeted linears on the calibration text: (sketch, report)."""
        if tokenizer is None:
            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            if not name:
                raise LeantuneError("sketchtune: fitting needs the model's tokenizer; this model has no name to load it by")
            tokenizer = load_tokenizer(name)
        ids = calibration_ids(tokenizer, self.calib, self.samples, self.seq_len, self.seed)
        names = [name for name, _ in resolve_targets(model, self)]
        sketch, report = fit_sketch(model, ids, names, self.fit_settings(), progress)
        sketch.settings = {key: getattr(self, key) for key in FIT_SETTING_KEYS}
        sketch.settings["calib"] = source_name(self.calib)
        return sketch, report

    # -- attaching ------------------------------------------------------------------------------
    def attach_to_model(self, model: nn.Module, adapter_name: str) -> list[str]:
        sketch = self.obtain_sketch(model)
        names = self._sketched_names(model, sketch)
        if self.sketch_id is None:
            self.sketch_id = sketch.content_id()
        elif self.sketch_id != sketch.content_id():
            raise LeantuneError(f"these tables belong to sketch {self.sketch_id}, but "
                                f"{self.sketch or 'the sketch fitted now'} is sketch {sketch.content_id()}")
        for name in names:
            original = model.get_submodule(name)
            base = SketchedLinear(sketch.layers[name].to(original.bias.device if original.bias is not None
                                                         else original.weight.device),
                                  original.bias, dense_dtype=original.weight.dtype)
            replace_module(model, name, SketchLayer(base, adapter_name, dtype=adapter_dtype(original.weight)))
        return names

    def _sketched_names(self, model: nn.Module, sketch: Sketch) -> list[str]:
        """Every linear of the sketch, checked against the model (and against explicit targets)."""
        names = sorted(sketch.layers)
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise LeantuneError(f"sketch layer '{name}' is not a module of this model") from None
            layer = sketch.layers[name]
            if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != (
                    layer.out_features, layer.in_features):
                raise LeantuneError(f"sketch layer '{name}' is {layer.out_features} x {layer.in_features}, "
                                    f"the model's module there is {module}")
        default_targets = self.targets == "all-linear" and not self.exclude and self.layers is None
        if self.sketch is not None and not default_targets:
            wanted = {name for name, _ in resolve_targets(model, self)}
            if wanted != set(names):
                odd = sorted(wanted ^ set(names))[0]
                raise LeantuneError(f"sketchtune: targets select a different set of modules than the sketch holds "
                                    f"(e.g. '{odd}'); a sketch is attached whole, leave targets at their default")
        return names
