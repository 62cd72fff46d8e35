"""The server's engine: one thread that owns the model and runs step-level (continuous) batching.

Requests wait in a bounded queue. Between decode steps the engine admits waiting requests (up to
`max_batch` running), prefills them together and adds them to the running batch; each step then
decodes one token for every running sequence, whatever its adapter (`adapter_names=` per row,
methods/rows.py), and finished or cancelled sequences leave. Adapter loads and unloads run on the
same thread between steps, so no forward ever sees a half-attached adapter.

Results go back as events per request: ("text", delta), then ("done", finish reason) or ("error",
message), on the request's own queue or through its `notify` callback (the HTTP layer's event loop),
which turns them into responses or SSE chunks.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .. import api
from ..errors import LeantuneError
from ..eval.generation import end_token_ids
from .batch import RunningBatch, sample

log = logging.getLogger("leantune.serve")


def client_message(err: Exception) -> str:
    """What a client may read of an error: the sentence of one it caused (LeantuneError), and for any
    other, a pointer to the server's log, which gets the traceback. An unexpected exception's text
    can carry paths and internals that are not the client's business."""
    if isinstance(err, LeantuneError):
        return str(err)
    log.error("request failed", exc_info=err)
    return f"internal error ({type(err).__name__}; details in the server's log)"


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes (benchmarks)
    events: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue)
    # Set by an async caller: called on the engine thread with each event instead of `events.put`
    # (the HTTP layer hands events to its event loop without a thread blocked per request).
    notify: Callable[[tuple[str, Any]], None] | None = None
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    ended_on_eos: bool = False  # the end token was generated: counted in usage (as vLLM does), not in the text
    text: str = ""
    sent: int = 0  # characters of text already sent
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    created: float = field(default_factory=time.time)

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, kind: str, value: Any) -> None:
        if self.notify is not None:
            self.notify((kind, value))
        else:
            self.events.put((kind, value))


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any, max_batch: int = 32, max_queue: int = 256):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.end_ids = set(end_token_ids(tokenizer))
        self.batch = RunningBatch(model)
        self.running: list[Request] = []
        self.waiting: "queue.Queue[Request]" = queue.Queue()
        self.controls: "queue.Queue[tuple[Callable[[], Any], queue.Queue]]" = queue.Queue()
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="leantune-engine", daemon=True)
        # only this engine changes the served adapters (attach and detach, between steps): each decode
        # step can tell a change from the tensors' versions instead of reading every adapter tensor
        api.router(model).trust_versions = True

    # -- the HTTP side ------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)

    def submit(self, request: Request) -> Request:
        if self.waiting.qsize() + len(self.running) >= self.max_queue:
            raise QueueFull(f"the server holds {self.max_queue} requests already (--max-queue); retry later")
        if request.temperature > 0:  # on the logits' device: torch.multinomial takes no generator from another
            device = next(self.model.parameters()).device
            request.generator = torch.Generator(device=device).manual_seed(
                request.seed if request.seed is not None else int(torch.randint(0, 2 ** 62, (1,))))
        self.waiting.put(request)
        self.wake.set()
        return request

    def call(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the engine thread between steps and return its result (or raise its error)."""
        reply: queue.Queue = queue.Queue()
        self.controls.put((function, reply))
        self.wake.set()
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def busy_adapters(self) -> set[str | None]:
        """Adapters of running or waiting requests; call it on the engine thread (`call`)."""
        with self.waiting.mutex:  # HTTP threads put into the queue meanwhile
            waiting = list(self.waiting.queue)
        return {r.adapter for r in self.running} | {r.adapter for r in waiting}

    # -- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping:
            self._run_controls()
            self._admit()
            if not self.running:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            self._step()

    def _run_controls(self) -> None:
        while not self.controls.empty():
            function, reply = self.controls.get()
            try:
                reply.put((True, function()))
            except Exception as err:  # handed back to the caller, who answers the HTTP request
                reply.put((False, err))

    def _admit(self) -> None:
        newcomers = []
        attached = set(api.attached(self.model))
        while len(self.running) + len(newcomers) < self.max_batch and not self.waiting.empty():
            request = self.waiting.get()
            if request.adapter is not None and request.adapter not in attached:  # unloaded while it waited
                request.emit("error", f"adapter '{request.adapter}' was unloaded")
            elif not request.cancelled:
                newcomers.append(request)
        if not newcomers:
            return
        try:
            logits = self.batch.prefill([r.prompt_ids for r in newcomers], [r.adapter for r in newcomers])
        except Exception as err:  # e.g. an adapter unloaded while its request waited
            message = client_message(err)
            for request in newcomers:
                request.emit("error", message)
            return
        self.running.extend(newcomers)
        self._advance(newcomers, logits)

    def _step(self) -> None:
        try:
            logits = self.batch.decode([r.generated[-1] for r in self.running])
        except Exception as err:  # the batch cannot go on: its requests fail, the server keeps serving
            message = client_message(err)
            for request in self.running:
                request.emit("error", message)
            self.batch.keep([])
            self.running = []
            return
        self._advance(self.running, logits)

    def _advance(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Sample one token per request (the last rows of the batch, in order), emit text, drop the finished."""
        for request, row in zip(requests, logits):
            if request.cancelled:
                request.finish_reason = "cancelled"
                continue
            try:
                token = sample(row, request.temperature, request.top_p, request.generator)
                self._append(request, token)
            except Exception as err:  # this request fails; the others and the engine go on
                request.finish_reason = "error"
                request.emit("error", client_message(err))
        kept = [i for i, r in enumerate(self.running) if r.finish_reason is None]
        if len(kept) != len(self.running):
            self.batch.keep(kept)
            self.running = [self.running[i] for i in kept]

    def _append(self, request: Request, token: int) -> None:
        if token in self.end_ids and not request.ignore_eos:
            request.ended_on_eos = True
            self._finish(request, "stop")
            return
        request.generated.append(token)
        request.text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
        cut = min((request.text.find(s) for s in request.stop if s in request.text), default=-1)
        if cut >= 0:
            request.text = request.text[:cut]
            self._finish(request, "stop")
            return
        if len(request.generated) >= request.max_tokens:
            self._finish(request, "length")
            return
        # hold back what may still become a stop string, and a half-decoded character
        hold = max((len(s) - 1 for s in request.stop), default=0)
        ready = len(request.text) - hold
        while ready > request.sent and request.text[ready - 1] == "\ufffd":
            ready -= 1
        if ready > request.sent:
            request.emit("text", request.text[request.sent:ready])
            request.sent = ready

    def _finish(self, request: Request, reason: str) -> None:
        if len(request.text) > request.sent:
            request.emit("text", request.text[request.sent:])
            request.sent = len(request.text)
        request.finish_reason = reason
        request.emit("done", reason)

