"""What the server serves: the base model's name, the adapters by name, and the checks that turn a
request into an engine `Request` (or a 4xx `ServeError` naming the culprit).

Adapters are leantune adapters or PEFT adapters (told apart by `peft_type` in adapter_config.json),
loaded at start-up (`--adapter NAME=DIR`) or over HTTP below `--adapter-root` only: a path that
resolves outside the root (`..`, an absolute path, a symlink out) is refused, and without a root
loading over HTTP is off.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import jinja2  # chat templates are jinja; torch requires it, so it is always there
from torch import nn

from .. import api
from ..adapters import import_peft, load_adapter
from ..errors import LeantuneError
from .engine import Engine, Request

# Prompt tuning routes per row in `model(..., adapter_names=)` and `generate`, but its virtual tokens
# would have to join the running batch's cache and mask, which the server keeps itself (batch.py).
SERVED_METHODS = tuple(method for method in api.ROUTABLE_METHODS if method != "prompt")


class ServeError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def attach_adapter(model: nn.Module, name: str, path: str | Path) -> None:
    """Load the leantune or PEFT adapter in `path` onto `model` as adapter `name`."""
    config = Path(path) / "adapter_config.json"
    try:
        document = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        document = {}
    if isinstance(document, dict) and "peft_type" in document:
        import_peft(model, path, adapter_name=name)
    else:
        load_adapter(model, path, adapter_name=name)
    method = api.attached(model)[name].method_name
    if method not in SERVED_METHODS:
        api.detach(model, name)
        remedy = ("run it per row with model.generate(..., adapter_names=) instead" if method == "prompt"
                  else "serve its merged export as a model instead")
        raise LeantuneError(f"'{path}' is a {method} adapter, which the server cannot batch per row (it serves "
                            f"{', '.join(SERVED_METHODS)}); {remedy}")
    model.eval()


class AdapterRegistry:
    def __init__(self, engine: Engine, base_name: str, adapter_root: str | None = None,
                 paths: dict[str, str] | None = None):
        self.engine = engine
        self.base_name = base_name
        self.root = Path(adapter_root).resolve() if adapter_root else None
        self.paths: dict[str, str] = dict(paths or {})
        config = getattr(engine.model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None)
        self._longest_token: int | None = None  # characters of the vocabulary's longest token, read on first use

    # -- requests ---------------------------------------------------------------------------
    def request(self, model: str, prompt: str, max_tokens: int | None, temperature: float, top_p: float,
                stop: tuple[str, ...], seed: int | None, fill_context: bool = False, chat: bool = False) -> Request:
        """`max_tokens` None: 16 (OpenAI's completions default), or with `fill_context` the rest of the context.
        A chat prompt is the template's rendering, which writes the special tokens it wants itself (a
        tokenizer that adds BOS would add a second one), so it is encoded without adding any."""
        if model != self.base_name and model not in self.paths:
            raise ServeError(404, f"model '{model}' does not exist; served: {', '.join(self.names())}",
                             param="model", code="model_not_found")
        if not prompt:
            raise ServeError(400, "prompt: the prompt is empty; give some text to continue", param="prompt")
        self._check_not_far_beyond_context(prompt)
        ids = self.engine.tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        if max_tokens is None:
            max_tokens = (self.context - len(ids) if fill_context and self.context else 16)
            if max_tokens < 1:
                raise ServeError(400, f"the prompt ({len(ids)} tokens) fills the model's context of {self.context} "
                                 "tokens", param="messages", code="context_length_exceeded")
        if max_tokens <= 0:
            raise ServeError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if self.context is not None and len(ids) + max_tokens > self.context:
            raise ServeError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {self.context} tokens", param="max_tokens",
                             code="context_length_exceeded")
        return Request(ids, None if model == self.base_name else model, max_tokens, temperature, top_p, stop, seed)

    def _check_not_far_beyond_context(self, prompt: str) -> None:
        """A prompt with more characters than the context holds tokens of the longest token in the
        vocabulary is too long whatever it tokenizes to: refused before tokenizing, which for megabytes
        takes seconds on the event loop that every other client shares."""
        if self.context is None:
            return
        if self._longest_token is None:
            self._longest_token = max((len(token) for token in self.engine.tokenizer.get_vocab()), default=1)
        if len(prompt) > self.context * max(self._longest_token, 1):
            raise ServeError(400, f"the prompt ({len(prompt):,} characters) exceeds the model's context of "
                             f"{self.context} tokens", param="prompt", code="context_length_exceeded")

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ServeError(400, "this model's tokenizer has no chat template; use /v1/completions",
                             param="messages")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as err:  # e.g. the template's raise_exception: roles must alternate
            raise ServeError(400, f"messages: the model's chat template refuses them: {err}", param="messages") from None

    # -- adapters -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [self.base_name, *self.paths]

    def model_cards(self) -> list[dict[str, Any]]:
        base = {"id": self.base_name, "object": "model", "created": 0, "owned_by": "leantune", "root": self.base_name,
                "parent": None}
        return [base] + [{"id": name, "object": "model", "created": 0, "owned_by": "leantune", "root": path,
                          "parent": self.base_name} for name, path in self.paths.items()]

    def resolve(self, lora_path: str) -> Path:
        if self.root is None:
            raise ServeError(403, "loading adapters over HTTP is off; start the server with --adapter-root DIR",
                             param="lora_path")
        try:
            path = (self.root / lora_path).resolve()
            inside = path.is_relative_to(self.root)
            folder = inside and path.is_dir()
            outside = next((entry for entry in _entries(path) if not entry.resolve().is_relative_to(self.root)),
                           None) if folder else None
        except (OSError, ValueError):  # a NUL byte, a name longer than the filesystem takes
            raise ServeError(400, "lora_path is not a path this server can open", param="lora_path") from None
        if not inside:
            raise ServeError(403, f"lora_path '{lora_path}' lies outside the adapter root", param="lora_path")
        if not folder:
            raise ServeError(404, f"lora_path '{lora_path}' is not an adapter directory under the adapter root",
                             param="lora_path")
        if outside is not None:  # the folder is inside, but a link in it would read from elsewhere
            raise ServeError(403, f"lora_path '{lora_path}' holds '{outside.relative_to(path)}', a link that points "
                             "outside the adapter root", param="lora_path")
        return path

    def load(self, name: str, lora_path: str) -> None:
        path = self.resolve(lora_path)
        check_adapter_name(name, self.base_name)
        # checked, attached and recorded on the engine thread: two loads of one name cannot interleave
        self.engine.call(lambda: self._load_now(name, path, lora_path))

    def _load_now(self, name: str, path: Path, lora_path: str) -> None:
        if name in self.paths or name in api.attached(self.engine.model):
            raise ServeError(400, f"an adapter named '{name}' is already served; unload it first", param="lora_name")
        try:
            attach_adapter(self.engine.model, name, path)
        except Exception as err:  # a bad adapter directory: nothing of it stays attached
            if name in api.attached(self.engine.model):
                api.detach(self.engine.model, name)
            raise ServeError(400, f"adapter '{lora_path}': {err}", param="lora_path") from None
        self.paths[name] = str(path)

    def unload(self, name: str) -> None:
        self.engine.call(lambda: self._unload_now(name))

    def _unload_now(self, name: str) -> None:
        if name not in self.paths:
            raise ServeError(404, f"no adapter named '{name}' is loaded", param="lora_name")
        if name in self.engine.busy_adapters():
            raise ServeError(409, f"adapter '{name}' has requests in flight; unload it when they are done",
                             param="lora_name")
        api.detach(self.engine.model, name)
        del self.paths[name]


def _entries(folder: Path) -> Iterator[Path]:
    """Every file and folder under `folder`, links listed but not followed."""
    for parent, folders, files in os.walk(folder, followlinks=False):
        yield from (Path(parent) / name for name in [*folders, *files])


RESERVED_NAMES = (api.BASE_ROW, "base")


def check_adapter_name(name: str, base_name: str) -> None:
    """Names a request's `model` could not tell from the base model are refused."""
    if name == base_name or name in RESERVED_NAMES:
        raise ServeError(400, f"'{name}' names the base model; choose another adapter name", param="lora_name")
    if name != name.strip():
        raise ServeError(400, f"lora_name '{name}' starts or ends with white space, which a request's model "
                         "field would not show; choose another adapter name", param="lora_name")
