"""The contract every method keeps, checked once for all of them on a tiny model.

- attach changes the output by nothing (within the init tolerance; prefix tuning's random prefixes
  act from the start) and makes exactly the method's own tensors trainable; a backward reaches each
  of them and nothing else;
- with random (never zero) adapter tensors: `disabled` is the exact base, before and after a merge;
  a merge keeps the adapted output; unmerge gives back the exact base tensors and the exact
  adapted output; detach gives back the exact base model (Full: keeps the trained weights);
- `detach(keep_merged=True)` keeps the merged output and leaves no adapter behind;
- a method that cannot be merged (bottleneck adapters) is refused by `lt.merge` and
  `detach(keep_merged=True)` with one sentence, before anything changes;
- save/load onto a fresh base rebuilds the same adapter and the exact same output.

Method-specific behaviour (forward/gradient references, options, errors) stays in test_<method>.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import leantune as lt
from conftest import randomize_adapter
from helpers import CALIB_TEXT, sketch_config
from leantune.methods.base import MethodConfig
from leantune.methods.layer import AdapterLayer, named_adapter_layers
from leantune.methods.sketch import SketchTune
from leantune.methods.sketch.layer import SketchedLinear

# The tolerance of "merged == adapted" for dense float32 bases (float64 ones use torch's defaults).
MERGE_FLOAT32 = {"rtol": 1e-4, "atol": 1e-5}
EXACT = {"rtol": 0, "atol": 0}
UNMERGEABLE = r"adapter 'default' \(\w+\) cannot be merged into the base weights: its update is not a change of weights"


@dataclass(frozen=True)
class Case:
    id: str
    config: Callable[..., MethodConfig]  # called with the fitted sketch directory
    model: str = "tiny-llama"
    scale: float = 0.1  # of the random adapter tensors
    init: dict | None = None  # attach vs base: None exact, else a tolerance
    merge: str = "close"  # "exact": columns/weights already in place; "close": float rounding; "quantized"
    merge_tolerance: dict | None = None  # for "close" on float32 (default MERGE_FLOAT32)
    # "quantized": max |merged - adapted| < this x max |adapted - base|. Requantizing W0 + ΔW rounds
    # it to the NF4 grid again; on these cases that moves the logits by 0.15-0.20x what the adapter did.
    quantized_error: float = 0.25
    base: str = "original"  # "original": disabled runs the model as loaded; "attached": the base attach built
    detach: str = "base"  # "base": the exact base comes back; "dense-sketch": Ŵ as nn.Linear; "trained": Full
    rewrites_base: bool = False  # the init moves part of W0 into the adapter (PiSSA): the base tensors differ
    mergeable: bool = True  # False: lt.merge refuses with UNMERGEABLE, and the model is left as it was
    keeps_output: bool = True  # attach leaves the output as it was (within `init`); prompt tokens act at once
    dtypes: tuple = (torch.float32, torch.float64)
    keeps_output: bool = True  # False: the adapter acts from attach on (prefix tuning's random prefixes)
    mergeable: bool = True  # False: lt.merge and detach(keep_merged=True) refuse (UNMERGEABLE)


CASES = [
    Case("lora", lambda _: lt.LoRA(r=4, alpha=8)),
    Case("lora-rslora", lambda _: lt.LoRA(r=4, alpha=8, rslora=True)),
    # dropout > 0 takes the unfused path; in eval mode (load_model's) it must not drop anything
    Case("lora-dropout", lambda _: lt.LoRA(r=4, alpha=8, dropout=0.3)),
    Case("lora-fa", lambda _: lt.LoRA(r=4, alpha=8, freeze_a=True)),  # A frozen at its init, saved with B
    Case("dora-fa", lambda _: lt.DoRA(r=4, alpha=8, freeze_a=True), init={"rtol": 1e-5, "atol": 1e-5}),
    # PiSSA: the base holds W0 - s B0 A0, the factors start at B0, A0; detach must give W0 (or the merge) back
    Case("lora-pissa", lambda _: lt.LoRA(r=4, alpha=8, init="pissa"), init={"rtol": 1e-4, "atol": 1e-5},
         rewrites_base=True),
    Case("dora-pissa", lambda _: lt.DoRA(r=4, alpha=8, init="pissa", dropout=0.1), init={"rtol": 1e-4, "atol": 1e-5},
         rewrites_base=True),
    Case("dora", lambda _: lt.DoRA(r=4, alpha=8), init={"rtol": 1e-5, "atol": 1e-5}),
    # tiny-qwen2: k/v biases, which output scaling merges too; up_proj scales its output, down_proj its input
    Case("ia3", lambda _: lt.IA3(targets=["k_proj", "v_proj", "up_proj", "down_proj"], feedforward=["down_proj"]),
         model="tiny-qwen2", scale=0.2),
    Case("bitfit", lambda _: lt.BitFit(), model="tiny-qwen2", scale=0.5),  # the q/k/v biases
    Case("bitfit-add-bias", lambda _: lt.BitFit(add_bias=True), scale=0.5),  # merge adds biases, unmerge drops them
    Case("full", lambda _: lt.Full(keep_base=True), scale=0.05, merge="exact", detach="trained"),
    Case("paca", lambda _: lt.PaCA(r=8, alpha=16, seed=5), merge="exact"),
    # a hybrid adapter: parts on disjoint targets, one adapter to the API
    Case("hybrid", lambda _: lt.Hybrid(parts=[lt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]),
                                              lt.PaCA(r=8, alpha=16, targets=["down_proj"]),
                                              lt.IA3(targets=["k_proj"], feedforward=[])])),
    # NF4 bases: merging requantizes, so the merged output is only near the adapted one
    Case("lora-nf4", lambda _: lt.LoRA(r=4, alpha=8, quantize="nf4"), merge="quantized",
         base="attached"),
    Case("dora-nf4", lambda _: lt.DoRA(r=4, alpha=8, quantize="nf4"), init={"rtol": 1e-5, "atol": 1e-5},
         merge="quantized", base="attached"),
    Case("paca-nf4", lambda _: lt.PaCA(r=8, alpha=16, quantize="nf4"), scale=0.02, merge="quantized",
         base="attached"),
    # the base is the fitted sketch; detach turns it into a dense nn.Linear holding Ŵ
    Case("sketchtune", lambda sketch_dir: SketchTune(sketch=str(sketch_dir)), scale=0.02,
         merge_tolerance={"rtol": 1e-5, "atol": 1e-5}, base="attached", detach="dense-sketch",
         dtypes=(torch.float32,)),
    # bottleneck adapters around whole sublayers: after the feed-forward (Pfeiffer), after both (Houlsby),
    # beside attention (parallel, on tiny-qwen2 whose attention has biases)
    Case("adapter", lambda _: lt.Adapter(bottleneck=8), scale=0.5, mergeable=False),
    Case("adapter-houlsby", lambda _: lt.Adapter(bottleneck=8, where="both"), scale=0.5, mergeable=False),
    Case("adapter-parallel", lambda _: lt.Adapter(reduction=16, placement="parallel", where="attn", activation="silu",
                                                  scale=4.0), model="tiny-qwen2", scale=0.5, mergeable=False),
    Case("prompt", lambda _: lt.PromptTuning(num_virtual_tokens=3), scale=0.05, keeps_output=False, mergeable=False),
    # key/value prefixes through the attention cache; GQA shapes on both tiny models
    Case("prefix", lambda _: lt.PrefixTuning(num_virtual_tokens=5), keeps_output=False, mergeable=False),
    Case("prefix-reparam", lambda _: lt.PrefixTuning(num_virtual_tokens=4, reparam_hidden=8), model="tiny-qwen2",
         keeps_output=False, mergeable=False),
]
CASE_IDS = [case.id for case in CASES]
DTYPE_CASES = [pytest.param(case, dtype, id=f"{case.id}-{str(dtype).removeprefix('torch.')}")
               for case in CASES for dtype in case.dtypes]


@pytest.fixture(scope="module")
def fitted_sketch_dir(tmp_path_factory):
    from leantune.methods.sketch.pack import save_sketch

    folder = tmp_path_factory.mktemp("contract-sketch")
    calib = folder / "calib.txt"
    calib.write_text(CALIB_TEXT)
    sketch, report = sketch_config(str(calib)).fit(lt.load_model("tiny-llama"))
    return save_sketch(sketch, folder / "sketch", report)


@pytest.fixture
def make_config(request):
    """`make_config(case)`: a fresh config for the case (fitting the shared sketch on first use)."""
    def make(case: Case) -> MethodConfig:
        sketch_dir = request.getfixturevalue("fitted_sketch_dir") if case.id == "sketchtune" else None
        return case.config(sketch_dir)
    return make


def load_base(case: Case, dtype: torch.dtype = torch.float32):
    """The case's tiny model; linear biases (zero-initialised) get random values, so merges must carry them.

    The global RNG is seeded too: attach draws initial adapter tensors (LoRA's A) from it."""
    torch.manual_seed(0)
    model = lt.load_model(case.model, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator, dtype=dtype) * 0.1)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def base_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the names detach will give them: adapter tensors left out, base_layer unwrapped,
    and so are tensors of modules the base did not have (a model method's own, e.g. prompt tuning's)."""
    adapter_keys = {f"{name}.{key}" if name else key
                    for name, layer in named_adapter_layers(model) for key in layer.adapter_state_dict()}
    base_modules = model.__dict__.get("base_module_names")
    state = {key.replace(".base_layer.", "."): value.detach().clone()
             for key, value in model.state_dict().items() if key not in adapter_keys}
    return {key: value for key, value in state.items()
            if base_modules is None or key.rpartition(".")[0] in base_modules}


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert value.dtype == want[key].dtype and torch.equal(value, want[key]), key


def assert_dense_linears(model, names) -> None:
    assert names and all(type(model.get_submodule(name)) is torch.nn.Linear for name in names)
    assert not any(isinstance(m, SketchedLinear) for m in model.modules())


def merge_tolerance(case: Case, dtype: torch.dtype) -> dict:
    if case.merge == "exact":
        return EXACT
    return (case.merge_tolerance or MERGE_FLOAT32) if dtype == torch.float32 else {}


def assert_merged_output(case: Case, dtype, merged, adapted, base) -> None:
    if case.merge == "quantized":
        assert (merged - adapted).abs().max() < case.quantized_error * (adapted - base).abs().max()
    else:
        torch.testing.assert_close(merged, adapted, **merge_tolerance(case, dtype))


def assert_merge_refused(model, merge: Callable[[], object], tokens, adapted) -> None:
    """`merge()` raises the one-sentence refusal and leaves the adapter attached, unmerged, unchanged."""
    attached, state = dict(lt.attached(model)), base_state(model)
    with pytest.raises(lt.LeantuneError, match=UNMERGEABLE) as caught:
        merge()
    assert "\n" not in str(caught.value) and str(caught.value).count(". ") == 0
    assert lt.attached(model) == attached and not any(layer.merged for _, layer in named_adapter_layers(model))
    assert_same_tensors(base_state(model), state)
    torch.testing.assert_close(logits(model, tokens), adapted, **EXACT)


def attach_to_base(case: Case, config: MethodConfig, tokens, dtype=torch.float32):
    """A fresh base with the case's adapter attached; returns the model and the base logits (from `disabled`).

    Where the base stays the original model, `disabled` runs it exactly as loaded and attach changed
    none of its tensors."""
    model = load_base(case, dtype)
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    original = logits(model, tokens)
    model.__dict__["base_module_names"] = {name for name, _ in model.named_modules()}
    lt.attach(model, config)
    model.original_state = original_state
    with lt.disabled(model):
        base = logits(model, tokens)
    if case.base == "original":
        torch.testing.assert_close(base, original, **EXACT)
        if not case.rewrites_base:
            assert_same_tensors(base_state(model), original_state)
    return model, base


def randomize(case: Case, model, base, tokens):
    """Random (never zero) adapter tensors; returns the adapted logits, which must differ from the base."""
    randomize_adapter(model, scale=case.scale)
    adapted = logits(model, tokens)
    assert adapted.dtype == base.dtype and not torch.allclose(adapted, base, atol=1e-3)
    return adapted


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_attach_keeps_the_output_and_trains_only_the_adapter(case, make_config, tokens):
    config = make_config(case)
    model, base = attach_to_base(case, config, tokens)
    assert lt.attached(model) == {"default": config}
    if case.keeps_output:
        torch.testing.assert_close(logits(model, tokens), base, **(case.init or EXACT))
    else:
        assert not torch.allclose(logits(model, tokens), base, atol=1e-3)

    own = {id(p) for p in config.trainable_parameters(model, "default")}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and {id(p) for p in trainable.values()} == own
    assert not any(".base_layer." in name for name in trainable)
    assert lt.summary(model)["trainable"] == sum(p.numel() for p in trainable.values())

    randomize(case, model, base, tokens)
    model(tokens, labels=tokens).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("case, dtype", DTYPE_CASES)
def test_merge_unmerge_disabled_detach(case, dtype, make_config, tokens):
    model, base = attach_to_base(case, make_config(case), tokens, dtype)
    attached_base = base_state(model)
    adapted = randomize(case, model, base, tokens)
    assert adapted.dtype == dtype

    with lt.disabled(model):
        torch.testing.assert_close(logits(model, tokens), base, **EXACT)
        with lt.disabled(model):  # nested
            torch.testing.assert_close(logits(model, tokens), base, **EXACT)
    torch.testing.assert_close(logits(model, tokens), adapted, **EXACT)

    if case.mergeable:
        if case.merge == "quantized":  # rounding into 4 bits only when asked for
            with pytest.raises(lt.LeantuneError, match="requantize=True"):
                lt.merge(model)
        lt.merge(model, requantize=case.merge == "quantized")
        merged = logits(model, tokens)
        assert_merged_output(case, dtype, merged, adapted, base)
        with lt.disabled(model):
            torch.testing.assert_close(logits(model, tokens), base, **EXACT)
        torch.testing.assert_close(logits(model, tokens), merged, **EXACT)  # merged again after the block
    else:
        assert_merge_refused(model, lambda: lt.merge(model), tokens, adapted)

    lt.unmerge(model)
    if case.detach != "trained":  # Full has no separate base tensors: its weights are the trained ones
        assert_same_tensors(base_state(model), attached_base)
    torch.testing.assert_close(logits(model, tokens), adapted, **EXACT)

    adapted_names = [name for name, _ in named_adapter_layers(model)]
    lt.detach(model)
    assert lt.attached(model) == {} and not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    if case.detach == "base":
        assert_same_tensors(model.state_dict(), model.original_state if case.rewrites_base else attached_base)
        torch.testing.assert_close(logits(model, tokens), base, **EXACT)
    elif case.detach == "dense-sketch":
        assert_dense_linears(model, adapted_names)  # holding the fitted Ŵ
        torch.testing.assert_close(logits(model, tokens), base, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(logits(model, tokens), adapted, **EXACT)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_detach_keep_merged_keeps_the_merged_output(case, make_config, tokens, tmp_path):
    model, base = attach_to_base(case, make_config(case), tokens)
    adapted = randomize(case, model, base, tokens)
    if not case.mergeable:
        assert_merge_refused(model, lambda: lt.detach(model, keep_merged=True), tokens, adapted)
        assert_merge_refused(model, lambda: lt.save_merged_model(model, tmp_path / "merged"), tokens, adapted)
        assert_merge_refused(model, lambda: lt.save_merged_model(model, tmp_path / "merged", in_place=True),
                             tokens, adapted)
        assert not (tmp_path / "merged").exists()
        return
    adapted_names = [name for name, _ in named_adapter_layers(model)]
    lt.detach(model, keep_merged=True, requantize=case.merge == "quantized")
    assert lt.attached(model) == {} and not any(isinstance(m, AdapterLayer) for m in model.modules())
    if case.detach == "dense-sketch":
        assert_dense_linears(model, adapted_names)  # holding the trained tables' Ŵ, for export
    assert_merged_output(case, torch.float32, logits(model, tokens), adapted, base)


@pytest.mark.parametrize("case, dtype", DTYPE_CASES)
def test_save_load_round_trip(case, dtype, make_config, tokens, tmp_path):
    config = make_config(case)
    model, base = attach_to_base(case, config, tokens, dtype)
    adapted = randomize(case, model, base, tokens)
    lt.save_adapter(model, tmp_path / case.id)
    assert sorted(p.name for p in (tmp_path / case.id).iterdir()) == ["adapter.safetensors", "adapter_config.json"]

    fresh = lt.load_adapter(load_base(case, dtype), tmp_path / case.id)
    assert {name: c.to_dict() for name, c in lt.attached(fresh).items()} == {"default": config.to_dict()}

    def layers(m):  # each adapter layer's type and description (IA3's input/output scaling, PaCA's r...)
        return {name: (type(layer), layer.extra_repr()) for name, layer in named_adapter_layers(m)}

    assert layers(fresh) == layers(model)
    assert_same_tensors(config.state_dict(fresh, "default"), config.state_dict(model, "default"))
    torch.testing.assert_close(logits(fresh, tokens), adapted, **EXACT)
