"""The training loop: config -> model + adapter -> data -> AdamW steps -> checkpoints -> adapter + summary.

Everything a user can get wrong (config, data, out_dir) is checked before anything is written.
On CPU with a fixed seed the run is deterministic, and a run resumed from any checkpoint ends
bitwise equal to an uninterrupted one: the data stream is addressed by position, and the
checkpoint carries the adapter, optimizer, RNG states and that position.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import api
from ..adapters import load_adapter, save_adapter
from ..adapters.native import adapter_tensors
from ..data import BatchStream, prepare_dataset
from ..errors import LeantuneError
from ..eval.metrics import loss_and_perplexity
from ..files import atomic_write_text
from ..loss import causal_lm_loss, count_loss_tokens
from ..models import check_fits_positions, load_model, load_tokenizer
from . import checkpoint as ckpt
from .config import TrainConfig, resolved_dict, to_yaml
from .optim import build_optimizer, lr_factor, set_lr, warmup_steps
from .reporting import MetricsLog, NoMetrics, Progress, format_summary, peak_memory_bytes
from .rundir import (check_out_dir, check_resume_identity, check_same_data, describe_resume_changes, examples_digest,
                     remove_run_artifacts, resolve_out_dir)
from .distributed import held_bytes, sharded_grad_norm
from .interrupts import CtrlCStops
from .runtime import RunEnvironment, apply_model_options, compile_clock, compile_summary, without_model_options


class TrainingDiverged(LeantuneError):
    """The loss (or gradient norm) stopped being finite."""


@dataclass
class TrainResult:
    out_dir: Path
    adapter_dir: Path | None
    steps: int
    interrupted: bool = False
    summary: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # the trained model, adapter attached (None when nothing was trained)
    tokenizer: Any = None


def run_training(config: TrainConfig, resume: bool = False, overwrite: bool = False, model: Any = None,
                 tokenizer: Any = None, command: list[str] | None = None) -> TrainResult:
    """The training loop alone (`lt.train` is the job: this, then the study its config asks for)."""
    return Trainer(config, resume=resume, overwrite=overwrite, model=model, tokenizer=tokenizer, command=command).run()


# -- the job ----------------------------------------------------------------------------------------

class Trainer(CtrlCStops):
    def __init__(self, config: TrainConfig, resume: bool, overwrite: bool, model: Any = None, tokenizer: Any = None,
                 command: list[str] | None = None):
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.model = model
        self.tokenizer = tokenizer
        self.interrupts = 0  # Ctrl-C presses during training
        self.writing_checkpoint = False  # a checkpoint is being written: a second Ctrl-C waits for it
        self.stopping = False  # the run is saving its way out after the first Ctrl-C
        self.command = command  # how the run was started, for the resume hint

    # Preparation: nothing is written until every input has been checked.
    def prepare(self) -> None:
        cfg = self.config
        self.device = self.env.device
        self.out_dir = resolve_out_dir(cfg.out_dir, self.resume)
        check_out_dir(self.out_dir, self.resume, self.overwrite)
        resume_changes = check_resume_identity(self.out_dir, cfg) if self.resume else []
        method = cfg.method_config()
        self.parallel = self.env.parallel
        self.parallel.check_method(method)

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(cfg.model)
        tokenizer = self.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_examples, self.train_fit = prepare_dataset(cfg.data.train, tokenizer, cfg.max_length,
                                                         cfg.overlong, cfg.packing)
        self.data_digest = examples_digest(train_examples)
        self.train_stream = BatchStream(train_examples, cfg.batch_size, cfg.seed, self.pad_id,
                                        group_by_length=cfg.group_by_length)
        self.eval_examples = None
        if cfg.data.eval is not None:
            self.eval_examples, self.eval_fit = prepare_dataset(cfg.data.eval, tokenizer, cfg.max_length,
                                                                cfg.overlong, cfg.packing)

        if self.model is None:
            self.model = load_model(cfg.model)
        self.model.to(self.device)
        self.env.seed(cfg.seed)  # adapter initialisation depends on it
        api.attach(self.model, method)
        check_fits_positions(self.model, max(e.positions() for e in [*train_examples, *(self.eval_examples or [])]),
                             "the longest example", "lower max_length", api.virtual_tokens(self.model))
        apply_model_options(self.model, cfg)
        self.total_steps = self._total_steps()
        self.resume_point = self._resume_point()
        self.parallel.wrap(self.model)  # after the resumed adapter is in: sharding splits what it holds
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.adam_betas)
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.warmup = warmup_steps(cfg.warmup, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.chunked = None if cfg.chunked_loss == "auto" else bool(cfg.chunked_loss)
        if resume_changes:
            self.say(describe_resume_changes(resume_changes, self.total_steps))

    def say(self, text: str) -> None:
        """A line on stderr, from the writing process only."""
        if self.env.is_writer:
            print(text, file=sys.stderr, flush=True)

    def _total_steps(self) -> int:
        cfg = self.config
        return cfg.max_steps if cfg.max_steps is not None else self.train_stream.steps_for(cfg.epochs, cfg.grad_accum)

    def run(self) -> TrainResult:
        self.env = RunEnvironment.from_config(self.config)  # resolved once: device, precision check, threads
        with self.env.cpu_threads():
            result = self._run()
        self.env.parallel.close()  # after success only: a failing process exits at once, and torchrun stops the rest
        return result

    def _run(self) -> TrainResult:
        self.prepare()
        state = self._start_state()
        if state.get("finished"):
            self.say(f"the run in {self.out_dir} already finished at step {state['step']}; nothing to do")
            return TrainResult(self.out_dir, self.out_dir / "adapter", state["step"], summary=state)
        self._write_start_files(state)
        self.metrics = MetricsLog(self.out_dir, truncate_after=state["step"]) if self.env.is_writer else NoMetrics()
        self._announce(state)
        if "eval_loss_before" not in state:
            state["eval_loss_before"] = self.evaluate()
            if state["eval_loss_before"] is not None:
                self.metrics.write({"step": 0, "eval_loss": state["eval_loss_before"]})
                self.say(f"eval loss before training: {state['eval_loss_before']:.4f}")
        previous_handler = self._install_sigint()
        try:
            try:
                interrupted = self._loop(state)
            except KeyboardInterrupt:  # the second Ctrl-C
                return self._stopped_at_once(state)
            if interrupted:
                return self._save_and_stop(state)
        finally:
            self._restore_sigint(previous_handler)
        return self._finish(state)

    def _resume_point(self) -> dict[str, Any] | Path | None:
        """What --resume continues: a finished run's summary, a checkpoint (its adapter loaded now,
        before any sharding, the optimizer state later), or None."""
        if not self.resume:
            return None
        done = ckpt.finished_run(self.out_dir, self.total_steps)
        if done is not None:
            return done
        if self.env.is_writer:
            ckpt.remove_stale_temporaries(ckpt.checkpoint_root(self.out_dir))
        path = ckpt.latest_checkpoint(self.out_dir)
        if path is not None:
            ckpt.load_checkpoint_adapter(path, self.model)
        return path

    def _start_state(self) -> dict[str, Any]:
        fresh = dict(step=0, position=0, tokens=0, loss_tokens=0, elapsed_s=0.0, data_digest=self.data_digest)
        point = self.resume_point
        if not self.resume:
            return fresh
        if isinstance(point, dict):
            return point
        if point is None:
            self.say(f"no checkpoint in {self.out_dir}; starting from step 0")
            return fresh
        state = ckpt.load_checkpoint(point, self.optimizer, place=self.parallel.place if self.parallel.active else None)
        state = check_same_data(state, self.data_digest, self.out_dir)
        if state["step"] > self.total_steps:
            raise LeantuneError(f"--resume: the run in '{self.out_dir}' is at step {state['step']}, past the "
                                f"{self.total_steps} steps this config asks for; raise max_steps or epochs to "
                                "resume it")
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.say(f"resuming from {point} (step {state['step']})")
        return {k: v for k, v in state.items() if k not in ("format_version", "scaler")}

    def _write_start_files(self, state: dict[str, Any]) -> None:
        if not self.env.is_writer:
            return
        if self.overwrite and self.out_dir.is_dir():
            remove_run_artifacts(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "config.yaml", to_yaml(resolved_dict(self.config)))

    def _announce(self, state: dict[str, Any]) -> None:
        if not self.env.is_writer:
            return
        info = api.summary(self.model)
        cfg = self.config
        methods = ", ".join(a["method"] for a in info["adapters"].values()) or "no adapter"
        lines = [
            f"model {cfg.model} + {methods}: {info['trainable']:,} trainable of {info['total']:,} parameters",
            f"train data {cfg.data.train}: {self.train_fit.describe()}"
            + (f", packed into {len(self.train_stream.examples)} rows" if cfg.packing else ""),
        ]
        if self.eval_examples is not None:
            lines.append(f"eval data {cfg.data.eval}: {self.eval_fit.describe()}")
        processes = f" over {self.env.world_size} processes ({cfg.distributed})" if self.parallel.active else ""
        lines.append(f"{self.total_steps} steps of {cfg.batch_size}x{cfg.grad_accum} examples{processes} "
                     f"({self.train_stream.batches_per_epoch} batches per epoch), {cfg.precision} on {self.device}, "
                     f"output in {self.out_dir}")
        print("\n".join(lines), file=sys.stderr, flush=True)

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self, state: dict[str, Any]) -> bool:
        """Train until total_steps; True if stopped by Ctrl-C."""
        cfg = self.config
        self.model.train()
        progress = Progress(self.total_steps, state["step"], enabled=cfg.progress and self.env.is_writer)
        session_start = time.perf_counter()
        elapsed_before = state["elapsed_s"]
        tick_compile_clock = compile_clock(state, cfg.compile)
        session_tokens = 0
        try:
            while state["step"] < self.total_steps:
                step_start = time.perf_counter()
                loss, tokens, loss_tokens, grad_norm, lr = self._step(state)
                state["step"] += 1
                state["tokens"] += tokens
                state["loss_tokens"] += loss_tokens
                state["last_loss"] = loss
                session_tokens += tokens
                now = time.perf_counter()
                state["elapsed_s"] = elapsed_before + (now - session_start)
                tick_compile_clock()
                tokens_per_s = session_tokens / max(now - session_start, 1e-9)
                progress.update(loss=loss, lr=lr, tokens_per_s=tokens_per_s)
                if state["step"] % cfg.log_every == 0 or state["step"] == self.total_steps:
                    self.metrics.write({
                        "step": state["step"], "epoch": round(state["position"] / self.train_stream.batches_per_epoch, 4),
                        "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state["tokens"],
                        "tokens_per_s": round(tokens_per_s, 1), "step_s": round(now - step_start, 4),
                        "elapsed_s": round(state["elapsed_s"], 3)})
                if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < self.total_steps:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        self.metrics.write({"step": state["step"], "eval_loss": eval_loss})
                        progress.write(f"step {state['step']}: eval loss {eval_loss:.4f}")
                if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < self.total_steps:
                    self.save(state)
                if self.interrupts and state["step"] < self.total_steps:
                    return True
        finally:
            progress.close()
        return False

    def _step(self, state: dict[str, Any]) -> tuple[float, int, int, float, float]:
        """One optimizer step over up to grad_accum micro-batches (not past the epoch's end); the loss is
        the mean over all their loss tokens."""
        cfg = self.config
        lr = cfg.lr * lr_factor(state["step"], self.total_steps, self.warmup, cfg.schedule)
        set_lr(self.optimizer, lr)
        batches = self.train_stream.step_batches(state["position"], cfg.grad_accum, cfg.epochs if cfg.max_steps is None else None)
        loss_tokens = sum(count_loss_tokens(b["labels"]) for b in batches)  # of the global batch
        self.env.seed_step(cfg.seed, state["step"])
        total = 0.0
        for i, batch in enumerate(batches):
            batch = {k: v.to(self.device) for k, v in self.parallel.share(batch).items()}
            with self.parallel.gradient_sync(i == len(batches) - 1):
                with self.env.autocast():
                    loss = self.parallel.run(causal_lm_loss, self.model, batch["input_ids"], batch["labels"],
                                             batch["attention_mask"], chunk_tokens=cfg.loss_chunk_tokens,
                                             chunked=self.chunked, num_items=loss_tokens,
                                             position_ids=batch.get("position_ids"))
                value = loss.item()
                if not math.isfinite(value):
                    raise self._diverged(state, f"the loss is {value}")
                total += value
                loss = loss * self.parallel.loss_scale if self.parallel.active else loss
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        total = self.parallel.sum(total)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        limit = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
        grad_norm = sharded_grad_norm(torch.nn.utils.clip_grad_norm_(self.trainable, limit))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself when fp16 gradients overflowed
            self.scaler.update()
        elif not math.isfinite(grad_norm):
            raise self._diverged(state, f"the gradient norm is {grad_norm}")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state["position"] += len(batches)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        return total, tokens, loss_tokens, grad_norm, lr

    def _diverged(self, state: dict[str, Any], what: str) -> TrainingDiverged:
        latest = ckpt.latest_checkpoint(self.out_dir)
        keep = (f"the last good checkpoint is {latest} (resume with --resume, e.g. with a lower lr)"
                if latest is not None else "no checkpoint was saved yet")
        self.metrics.close()
        return TrainingDiverged(f"{what} at step {state['step'] + 1}; training stopped without saving, {keep}")

    def evaluate(self) -> float | None:
        """Mean loss per loss token over the eval set (None without eval data)."""
        if self.eval_examples is None:
            return None
        with self.env.autocast():  # each process its share of the batches, inside the wrapped root's forward
            result = self.parallel.run(loss_and_perplexity, self.model, self.eval_examples, self.pad_id, self.config.batch_size,
                                       self.config.progress and self.env.is_writer, (self.env.rank, self.env.world_size))
        return self.parallel.token_mean(result["loss_sum"], result["tokens"]) if self.parallel.active else result["loss"]

    def save(self, state: dict[str, Any], saved_adapter: Path | None = None) -> Path:
        self.writing_checkpoint = True
        try:
            return self._write_checkpoint(state, saved_adapter)
        finally:
            self.writing_checkpoint = False

    def _write_checkpoint(self, state: dict[str, Any], saved_adapter: Path | None) -> Path:
        trainer_state = {k: v for k, v in state.items() if k != "finished"}
        trainer_state["epoch"] = state["position"] // self.train_stream.batches_per_epoch
        trainer_state["schedule"] = {"name": self.config.schedule, "total_steps": self.total_steps,
                                     "warmup_steps": self.warmup, "peak_lr": self.config.lr}
        if self.scaler is not None:
            trainer_state["scaler"] = self.scaler.state_dict()
        return ckpt.save_checkpoint(self.out_dir, self.model, self.optimizer, trainer_state, self.config.keep_checkpoints,
                                    saved_adapter, gather=self.parallel.full_tensors, writer=self.env.is_writer)

    def _interrupted_result(self, state: dict[str, Any]) -> TrainResult:
        self.metrics.close()
        return TrainResult(self.out_dir, None, state["step"], interrupted=True, summary=state,
                           model=self.model, tokenizer=self.tokenizer)

    # -- the end ------------------------------------------------------------------------------------
    def _finish(self, state: dict[str, Any]) -> TrainResult:
        adapter_dir = self.out_dir / "adapter"
        tensors = self.parallel.full_tensors(adapter_tensors(self.model))
        if self.env.is_writer:
            save_adapter(self.model, adapter_dir, tensors=tensors)
        if self.config.save_every:  # a later run with a larger max_steps continues from the very end
            self.save(state, saved_adapter=adapter_dir)
        eval_after = self.evaluate()
        if eval_after is not None:
            self.metrics.write({"step": state["step"], "eval_loss": eval_after})
        summary = {
            "steps": state["step"],
            "epochs": round(state["position"] / self.train_stream.batches_per_epoch, 4),
            "tokens": state["tokens"],
            "loss_tokens": state["loss_tokens"],
            "time_s": round(state["elapsed_s"], 3),
            "tokens_per_s": round(state["tokens"] / max(state["elapsed_s"], 1e-9), 1),
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "final_loss": state.get("last_loss"),
            "eval_loss_before": state.get("eval_loss_before"),
            "eval_loss_after": eval_after,
            "train_examples": self.train_fit.kept,
            "train_truncated": self.train_fit.truncated,
            "train_dropped": self.train_fit.dropped,
            "adapter": str(adapter_dir),
        }
        summary.update(compile_summary(self.config, state))
        if self.parallel.active:
            summary.update(self._per_process_memory(summary["peak_memory_bytes"]))
        self.metrics.close()
        if not self.env.is_writer:
            return TrainResult(self.out_dir, adapter_dir, state["step"], summary=summary)
        atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(format_summary(summary), file=sys.stderr, flush=True)
        return TrainResult(self.out_dir, adapter_dir, state["step"], summary=summary,
                           model=self._model_for_after(adapter_dir), tokenizer=self.tokenizer)

    def _per_process_memory(self, peak: int) -> dict[str, Any]:
        """Per rank: peak memory, and the bytes of model and optimizer tensors it holds (its shards under FSDP)."""
        model_tensors = [*self.model.parameters(), *self.model.buffers()]
        optimizer_tensors = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        gather = self.parallel.gather_numbers
        return {"processes": self.env.world_size, "distributed": self.config.distributed,
                "peak_memory_bytes_per_process": gather(peak),
                "model_bytes_per_process": gather(held_bytes(model_tensors)),
                "optimizer_bytes_per_process": gather(held_bytes(optimizer_tensors))}

    def _model_for_after(self, adapter_dir: Path) -> Any:
        """The trained model for what follows training (the unit-test table): a sharded one is
        rebuilt whole in this process from the base and the adapter just saved."""
        if self.parallel.mode != "fsdp":
            return without_model_options(self.model)
        return load_adapter(load_model(self.config.model).to(self.device), adapter_dir)
