"""One benchmark configuration in a fresh process, so its peak memory is its own.

    python -m leantune.bench.worker SPEC.json RESULT.json

Loads the model (cheap after the first conversion), builds the row (floor, a leantune method or
Hugging Face PEFT), then: one untimed step that records the bytes saved for backward, `warmup`
untimed steps, `steps` timed steps, and optionally one profiled step. A step is forward + loss +
backward + AdamW step over the trainable parameters (the floor has none: no optimizer; peft-lora-fa
steps with PEFT's LoRA-FA optimizer). The result (or the error, with the phase it happened in) is
written as JSON to RESULT.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from .. import kernels
from ..api import attach, base_weight_bytes
from ..loss import causal_lm_loss
from ..methods import LoRA, config_from_dict
from ..methods.sketch.pack import save_sketch
from ..methods.targets import resolve_targets
from ..models import load_model
from . import measure as m
from .bound import counted_flops, gemm_rate
from .profile import profile_step

LOSSES = ("full", "chunked")


@dataclass
class WorkerSpec:
    row: str
    kind: str  # "floor" | "leantune" | "peft"
    settings: dict[str, Any] | None
    model: str
    batch: int
    seq: int
    steps: int
    warmup: int
    loss: str = "full"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    lr: float = 1e-4
    profile: bool = False
    # Import peft in every row of a run that has PEFT rows, so all processes start from the same RSS.
    preload_peft: bool = False
    mem_cap: int | None = None  # bytes; on CUDA it becomes the per-process memory fraction
    # "measure", or "prepare": fit what the row needs once (a SketchTune sketch) and save it to `output`
    task: str = "measure"
    output: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


# -- building the row's model --------------------------------------------------------------

def build_model(spec: WorkerSpec):
    model = load_model(spec.model, dtype=getattr(torch, spec.dtype), device=spec.device)
    if spec.kind == "floor":
        model.requires_grad_(False)
        # Backward must still run through the whole model, as it does for any adapter: make the
        # embeddings' output a leaf that wants a gradient.
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    elif spec.kind == "peft":
        model = _attach_peft(model, dict(spec.settings or {}), spec.loss)
    else:
        attach(model, config_from_dict(dict(spec.settings or {})))
    return model.train()


def _attach_peft(model, settings: dict[str, Any], loss: str = "full"):
    import peft  # optional: only the peft-* rows need it

    kind = settings.pop("peft")
    settings.pop("optimizer", None)  # make_optimizer's business
    builders = {"lora": peft.LoraConfig, "ia3": peft.IA3Config, "prompt": peft.PromptTuningConfig,
                "prefix": peft.PrefixTuningConfig}
    if kind not in builders:
        raise ValueError(f"no Hugging Face PEFT builder for '{kind}'")
    if kind == "lora" and "target_modules" not in settings:
        # exactly the modules leantune's "all-linear" adapts
        settings["target_modules"] = sorted({n.split(".")[-1] for n, _ in resolve_targets(model, LoRA())})
    config = builders[kind](**settings)
    if config.is_prompt_learning and loss == "chunked":  # PEFT adds them in its own forward, which the chunked loss skips
        raise ValueError("PEFT prompt learning puts its virtual tokens or prefixes in outside the decoder that the "
                         "chunked loss calls; measure this row with --chunked-loss off")
    model = peft.get_peft_model(model, config)
    if kind == "prompt":
        _score_real_positions(model, config.num_virtual_tokens)
    return model


def _score_real_positions(model, virtual_tokens: int) -> None:
    """PEFT's prompt-tuning forward returns logits for its virtual tokens too; the bench's loss scores
    the real positions only, as leantune's prompt tuning does (prefix tuning's live in the cache)."""
    def real_positions(module, args, output):
        output.logits = output.logits[:, virtual_tokens:]
        return output

    model.register_forward_hook(real_positions)


def make_optimizer(model, spec: WorkerSpec):
    """AdamW over the trainable parameters (None for the floor), or PEFT's LoRA-FA optimizer, which
    also freezes every lora_A: so it is built before anything counts the trainable parameters."""
    settings = spec.settings or {}
    if spec.kind == "peft" and settings.get("optimizer") == "lorafa":
        from peft.optimizers import create_lorafa_optimizer  # optional: only the PEFT rows need peft

        return create_lorafa_optimizer(model, r=settings["r"], lora_alpha=settings["lora_alpha"], lr=spec.lr)
    params = trainable_parameters(model)
    return torch.optim.AdamW(params, lr=spec.lr) if params else None


def trainable_parameters(model) -> list:
    unique = {id(p): p for p in model.parameters() if p.requires_grad}
    return list(unique.values())


def describe_model(model, kind: str) -> dict[str, Any]:
    """Parameter counts and weight bytes (as stored: NF4 weights count their packed bytes)."""
    params = {id(p): p for p in model.parameters()}.values()
    info = {
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "model_bytes": sum(t.numel() * t.element_size() for t in (*params, *model.buffers())),
        "adapted_base_bytes": None,
    }
    if kind == "leantune":
        info["adapted_base_bytes"] = base_weight_bytes(model)
    elif kind == "peft":
        from peft.tuners.tuners_utils import BaseTunerLayer  # optional: a peft-* row has it

        stored = sum(t.numel() * t.element_size() for module in model.modules() if isinstance(module, BaseTunerLayer)
                     for t in module.get_base_layer().parameters())
        info["adapted_base_bytes"] = {"stored": stored}
    return info


# -- the step ------------------------------------------------------------------------------

def make_step(model, input_ids, optimizer, loss: str, stock: bool = False) -> Callable[[], None]:
    """One training step; `stock`: every product through torch's own ops (the floor and PEFT rows,
    whose users run torch's GEMMs; the loaded model's linears and the chunked loss's head would
    otherwise go through oneDNN)."""
    loss_fn = partial(causal_lm_loss, chunked=(loss == "chunked"))
    record = torch.profiler.record_function
    products = kernels.torch_products if stock else contextlib.nullcontext

    def step() -> None:
        with products(), record("bench/forward+loss"):
            value = loss_fn(model, input_ids, input_ids)
        with products(), record("bench/backward"):
            value.backward()
        if optimizer is not None:
            with record("bench/optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return step


def run_measurement(spec: WorkerSpec, result: dict[str, Any]) -> None:
    if spec.preload_peft:
        import peft  # noqa: F401  (optional; see WorkerSpec.preload_peft)
    torch.manual_seed(spec.seed)
    device = torch.device(spec.device)
    if device.type == "cuda" and spec.mem_cap:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.mem_cap / total), device)
    model = build_model(spec)
    optimizer = make_optimizer(model, spec)
    generator = torch.Generator().manual_seed(spec.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (spec.batch, spec.seq), generator=generator).to(device)
    step = make_step(model, input_ids, optimizer, spec.loss, stock=spec.kind != "leantune")
    result.update(describe_model(model, spec.kind))

    m.touch_parameters(model)
    result["rss_after_load_bytes"] = m.current_rss()
    # Resetting the high-water mark also lowers what getrusage reports: keep the loading peak first.
    result["load_peak_rss_bytes"] = max(m.process_peak_rss(), m.peak_rss_since_reset() or 0)
    result["peak_rss_reset"] = m.reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result["memory_after_load_bytes"] = torch.cuda.memory_allocated(device)
    else:
        result["memory_after_load_bytes"] = result["rss_after_load_bytes"]

    result["phase"] = "step"
    with m.saved_for_backward(m.model_storages(model)) as seen:
        step()
    result["saved_bytes"] = sum(seen.values())
    for _ in range(spec.warmup):
        step()
    result["step_times_s"] = [m.timed(step, device) for _ in range(spec.steps)]
    result["matmul_flops"] = counted_flops(step, model, [spec.seq] * spec.batch)  # one more step, counted
    result["gemm_flops_per_s"] = gemm_rate(model, spec.batch * spec.seq)

    since_load = m.peak_rss_since_reset() if result["peak_rss_reset"] else None
    result["peak_rss_bytes"] = max(result["load_peak_rss_bytes"], m.process_peak_rss(), since_load or 0)
    if device.type == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["peak_memory_bytes"] = result["training_peak_bytes"] = result["cuda_max_allocated_bytes"]
    else:
        result["peak_memory_bytes"] = result["peak_rss_bytes"]
        # The high-water mark restarted after loading: the training steps' own peak.
        result["training_peak_bytes"] = since_load if since_load is not None else result["peak_rss_bytes"]
    result["fits"] = spec.mem_cap is None or result["peak_memory_bytes"] <= spec.mem_cap

    if spec.profile:
        result["phase"] = "profile"
        result["profile"] = profile_step(step, device)
    result["phase"] = "done"


def prepare(spec: WorkerSpec, result: dict[str, Any]) -> None:
    """Fit the row's sketch on the model and save it where the measuring processes will load it."""
    model = load_model(spec.model, dtype=getattr(torch, spec.dtype), device=spec.device)
    config = config_from_dict(dict(spec.settings or {}))
    result["phase"] = "prepare"
    sketch, report = config.fit(model)
    save_sketch(sketch, spec.output, report)
    result["output"] = spec.output
    result["phase"] = "done"


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(err).lower()


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes (which peft imports) logs CPU-kernel notices: they must not become a row's error line
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m leantune.bench.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = WorkerSpec(**json.loads(Path(argv[0]).read_text()))
    result: dict[str, Any] = {"row": spec.row, "phase": "setup", "seq": spec.seq, "batch": spec.batch}
    status = 0
    try:
        (prepare if spec.task == "prepare" else run_measurement)(spec, result)
    except Exception as err:  # every failure becomes a row error in the report, never a crash
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        result["error"] = f"{type(err).__name__}: {message}" if message else type(err).__name__
        result["out_of_memory"] = _is_out_of_memory(err)
        traceback.print_exc(file=sys.stderr)
        status = 1
    Path(argv[1]).write_text(json.dumps(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
