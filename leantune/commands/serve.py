"""`leantune serve --model M [--adapter NAME=DIR ...] [--host H] [--port P] [--max-batch N] [--max-queue N]
[--api-key KEY] [--adapter-root DIR]`: an OpenAI-compatible server over one base model and its adapters."""
from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path

from ..errors import LeantuneError

USAGE_NOTES = """\
Routes: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template),
GET /v1/models, and vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"} and
POST /v1/unload_lora_adapter {"lora_name"} (only with --adapter-root; lora_path must lie under it).
A request's "model" picks the adapter by name; the base model's name (--model) picks none.
Requests for different adapters share each decode step (continuous batching). LoRA, DoRA, IA3
and PaCA adapters, leantune's own or PEFT's, are served. SIGTERM or Ctrl-C finishes the requests
in flight, then exits.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model: smollm2-135m, a Hugging Face folder or hub id")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve the adapter in DIR (leantune or PEFT) under NAME; repeatable")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=32, help="sequences decoded together at most (default 32)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests held at once, running and waiting; more get 429 (default 256)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--adapter-root", help="directory under which /v1/load_lora_adapter may load adapters")
    parser.epilog = USAGE_NOTES


def parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LeantuneError(f"--adapter expects NAME=DIR, got '{spec}'")
        if name in adapters:
            raise LeantuneError(f"--adapter names '{name}' twice")
        adapters[name] = path
    return adapters


def check_can_listen(host: str, port: int) -> None:
    """A port another process holds (or a host this machine does not have) is the user's to change."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as err:
        raise LeantuneError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port or "
                            "--host") from None


def run(args: argparse.Namespace) -> int:
    try:
        # imported here, not at module level: `leantune --help` must not load torch nor need the serve extra
        import uvicorn
        from ..serving.app import create_app
    except ImportError as err:
        raise LeantuneError(f"leantune serve needs FastAPI and uvicorn ({err.name} is missing): "
                            "pip install 'leantune[serve]'") from None
    # imported here for the same reason: they load torch
    from ..models import load_model, load_tokenizer
    from ..serving.engine import Engine
    from ..serving.registry import RESERVED_NAMES, AdapterRegistry, attach_adapter

    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise LeantuneError(f"{flag} must be at least 1, got {value}")
    adapters = parse_adapters(args.adapter)
    if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
        raise LeantuneError(f"--adapter-root '{args.adapter_root}' is not a directory")
    check_can_listen(args.host, args.port)  # before minutes of loading, not after
    for name in adapters:
        if name == args.model or name in RESERVED_NAMES:
            raise LeantuneError(f"--adapter name '{name}' names the base model; choose another")
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    for name, path in adapters.items():
        attach_adapter(model, name, path)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue)
    registry = AdapterRegistry(engine, args.model, args.adapter_root, adapters)
    app = create_app(engine, registry, args.api_key)
    engine.start()
    print(f"serving {args.model} with {len(adapters)} adapter(s) on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=60))
    # uvicorn drains on SIGTERM, then re-raises it to the handler it found: a no-op here, so that a
    # drained server exits 0 instead of dying of the signal it already handled.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        engine.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0
