"""The OpenAI-compatible HTTP layer (FastAPI): completions, chat completions, models, and vLLM's
load/unload routes for adapters. Every error is OpenAI's error JSON with a 4xx status.

The request's `model` names the adapter (the base model's name for none). Requests go to the
engine (engine.py); a streaming response is server-sent events in OpenAI's chunk format, ended by
`data: [DONE]`. A client that disconnects cancels its request, which frees its row at the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, QueueFull, Request, client_message
from .registry import AdapterRegistry, ServeError


# OpenAI parameters this server does not implement, with the values that ask for nothing beyond it.
# Any other value is refused by name (400), so that no client gets a silently different result: one
# choice for n=3, no penalty for presence_penalty=1. Other unknown keys are ignored, as vLLM does.
_NOT_IMPLEMENTED = {
    "n": (None, 1), "best_of": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
    "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
}


class _Body(BaseModel):
    # strict: JSON's own types only (true is not a max_tokens of 1, "3" not 3); an integer is a float
    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(default=16)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2 ** 63 - 1)
    stream: bool = False
    ignore_eos: bool = False  # vLLM's extension (benchmarks: every request generates max_tokens)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI's API takes null for these: it means the default, as leaving the key out does."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in ("temperature", "top_p", "stream",
                                                                                "ignore_eos"))}
        return data

    def not_implemented(self) -> str | None:
        """The first parameter set to something this server does not do, or None."""
        extra = self.model_extra or {}
        return next((key for key, plain in _NOT_IMPLEMENTED.items()
                     if key in extra and not any(_same(extra[key], value) for value in plain)), None)


class CompletionBody(_Body):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        for part in [] if isinstance(content, str) else content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text is supported (a string, or parts of type 'text' with a 'text' "
                                 f"string); got a part of type {part.get('type')!r}")
        return content

    def as_template_input(self) -> dict[str, str]:
        """The message for the chat template; a list of text parts joins into one text, as OpenAI reads it."""
        text = self.content if isinstance(self.content, str) else "".join(part["text"] for part in self.content)
        return {"role": self.role, "content": text}


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None  # as OpenAI: without it, a reply may fill the rest of the context
    max_completion_tokens: int | None = None


class LoadBody(BaseModel):
    model_config = ConfigDict(strict=True)
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadBody(BaseModel):
    model_config = ConfigDict(strict=True)
    lora_name: str = Field(min_length=1)


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": code}})


def create_app(engine: Engine, adapters: AdapterRegistry, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="leantune serve")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: HttpRequest, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error(400, "the request body is not valid JSON", code="invalid_json")
        message = first.get("msg", "invalid value").removeprefix("Value error, ")
        return error(400, f"{where or 'body'}: {message}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: HttpRequest, err: StarletteHTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail), kind="not_found_error" if err.status_code == 404 else
                     "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(_request: HttpRequest, err: Exception) -> JSONResponse:
        # a bug or an environment failure: still OpenAI's error JSON, and the server goes on serving
        return error(500, client_message(err), kind="server_error")

    @app.middleware("http")
    async def authenticate(request: HttpRequest, call_next: Any) -> Any:
        given = request.headers.get("authorization", "")
        if api_key is not None and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error",
                         code="invalid_api_key")
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": adapters.model_cards()}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HttpRequest) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            return error(400, "prompt: give one prompt per request", param="prompt")
        return await _serve(body, prompts[0], "text_completion", request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: HttpRequest) -> Any:
        try:
            prompt = adapters.chat_prompt([m.as_template_input() for m in body.messages])
        except ServeError as err:
            return error(err.status, str(err), param=err.param)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await _serve(body, prompt, "chat.completion", request, fill_context=body.max_tokens is None)

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadBody) -> Any:
        try:
            await asyncio.to_thread(adapters.load, body.lora_name, body.lora_path)
        except ServeError as err:
            return error(err.status, str(err), param=err.param)
        return {"object": "adapter", "id": body.lora_name, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadBody) -> Any:
        try:
            await asyncio.to_thread(adapters.unload, body.lora_name)
        except ServeError as err:
            return error(err.status, str(err), param=err.param)
        return {"object": "adapter", "id": body.lora_name, "status": "unloaded"}

    async def _serve(body: _Body, prompt: str, kind: str, http: HttpRequest, fill_context: bool = False) -> Any:
        refused = body.not_implemented()
        if refused is not None:
            return error(400, f"{refused}: not supported by this server (leave it out, or send its default "
                              f"{_NOT_IMPLEMENTED[refused][1]!r})", param=refused, code="unsupported_parameter")
        try:
            request = adapters.request(body.model, prompt, body.max_tokens, body.temperature, body.top_p,
                                       _stops(body.stop), body.seed, fill_context, chat=kind == "chat.completion")
            request.ignore_eos = body.ignore_eos
            events = listen(request)
            engine.submit(request)
        except ServeError as err:
            return error(err.status, str(err), param=err.param, code=err.code)
        except QueueFull as err:
            return error(429, str(err), kind="rate_limit_error", code="queue_full")
        ident = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(_chunks(events, request, ident, kind, body.model, http),
                                     media_type="text/event-stream")
        try:
            text, reason = await _collect(events, request, http)
        except ServeError as err:
            return error(err.status, str(err), kind="server_error")
        return _response(ident, kind, body.model, text, reason, request)

    return app


def _same(given: Any, plain: Any) -> bool:
    """JSON equality (0 == 0.0) without Python's True == 1 and False == 0 (logprobs: 0 asks for some)."""
    if isinstance(given, bool) or isinstance(plain, bool):
        return given is plain
    return given == plain


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)  # "" stops nothing, alone or listed


def listen(request: Request) -> "asyncio.Queue[tuple[str, Any]]":
    """Route the request's events into an asyncio queue of the running loop (before submitting it)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    request.notify = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    return events


async def _events(events: "asyncio.Queue[tuple[str, Any]]", request: Request,
                  http: HttpRequest) -> AsyncIterator[tuple[str, Any]]:
    """The engine's events for `request`; a disconnected client cancels it."""
    checked = time.monotonic()
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                kind = None
            if time.monotonic() - checked >= 0.5:  # is the client still there? (also while tokens flow)
                checked = time.monotonic()
                if await http.is_disconnected():
                    request.cancel()
                    return
            if kind is None:
                continue
            yield kind, value
            if kind in ("done", "error"):
                return
    finally:
        if request.finish_reason is None:
            request.cancel()


async def _collect(events: "asyncio.Queue[tuple[str, Any]]", request: Request,
                   http: HttpRequest) -> tuple[str, str]:
    parts, reason = [], "cancelled"
    async for kind, value in _events(events, request, http):
        if kind == "text":
            parts.append(value)
        elif kind == "error":
            raise ServeError(500, f"generation failed: {value}")
        else:
            reason = value
    return "".join(parts), reason


def _usage(request: Request) -> dict[str, int]:
    prompt, completion = len(request.prompt_ids), len(request.generated) + request.ended_on_eos
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _response(ident: str, kind: str, model: str, text: str, reason: str, request: Request) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": ident, "object": kind, "created": int(request.created), "model": model, "choices": [choice],
            "usage": _usage(request)}


def _chunk(ident: str, kind: str, model: str, request: Request, text: str | None, reason: str | None,
           first: bool = False) -> str:
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if kind == "chat.completion":
        choice["delta"] = ({"role": "assistant", "content": text or ""} if first else
                           {} if text is None else {"content": text})
        object_name = "chat.completion.chunk"
    else:
        choice["text"] = text or ""
        object_name = "text_completion"
    payload = {"id": ident, "object": object_name, "created": int(request.created), "model": model,
               "choices": [choice]}
    if reason is not None:
        payload["usage"] = _usage(request)
    return f"data: {json.dumps(payload)}\n\n"


async def _chunks(events: "asyncio.Queue[tuple[str, Any]]", request: Request, ident: str, kind: str, model: str,
                  http: HttpRequest) -> AsyncIterator[str]:
    first = True
    async for event, value in _events(events, request, http):
        if event == "text":
            yield _chunk(ident, kind, model, request, value, None, first)
            first = False
        elif event == "error":
            yield f"data: {json.dumps({'error': {'message': str(value), 'type': 'server_error'}})}\n\n"
            return
        else:
            if first and kind == "chat.completion":
                yield _chunk(ident, kind, model, request, "", None, True)
            yield _chunk(ident, kind, model, request, None, value)
    yield "data: [DONE]\n\n"

