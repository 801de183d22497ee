"""The ``local-llm-kit`` command: chat, one-shot runs and the list of models.

    local-llm-kit run "Why is the sky blue?"          one answer, streamed
    local-llm-kit run --json "Hi"                     the raw CompletionResponse as JSON
    local-llm-kit chat                                interactive, streaming, with memory
    local-llm-kit models                              packaged and found models
    local-llm-kit serve [--model M ...] [--port 8000]  an OpenAI-compatible HTTP server
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from local_llm_kit.client import AsyncLLMClient, LLMClient
from local_llm_kit.config import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, ENV_PREFIX
from local_llm_kit.errors import LocalLLMKitError
from local_llm_kit.models import list_models

__all__ = ["main"]


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default=None, help="alias, GGUF file or model folder")
    parser.add_argument("--model-path", default=None, help="weights to load, or a folder to search")
    parser.add_argument("--backend", default=None, choices=["llama.cpp", "transformers"])
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="system message")


def _make_client(args: argparse.Namespace) -> LLMClient:
    client = LLMClient(args.model, model_path=args.model_path, backend=args.backend,
                       context_length=args.context_length, temperature=args.temperature, top_p=args.top_p)
    # Model preparation (assembling a packaged model, converting for transformers) reports
    # its progress on stderr through logging and progress bars.
    client.load()
    return client


def _stream_reply(client: LLMClient, messages: list[dict[str, Any]], args: argparse.Namespace) -> str:
    parts: list[str] = []
    with client.chat.completions.create(messages=messages, stream=True, max_tokens=args.max_tokens,
                                        seed=args.seed) as stream:
        for chunk in stream:
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                parts.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)


def _run(args: argparse.Namespace) -> int:
    client = _make_client(args)
    messages: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    if args.json:
        response = client.chat.completions.create(messages=messages, max_tokens=args.max_tokens, seed=args.seed)
        print(response.model_dump_json(indent=2))
    else:
        _stream_reply(client, messages, args)
    return 0


def _chat(args: argparse.Namespace) -> int:
    client = _make_client(args)
    # The client's own memory: a long session keeps to the context by leaving out its oldest turns
    # (system message kept), instead of failing once the history outgrows it.
    client.enable_memory(client.settings.context_length)
    if args.system:
        client.add_to_memory([{"role": "system", "content": args.system}])
    print(f"Chatting with {client.model} ({client.settings.backend}). Empty line or Ctrl-D to quit.")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            return 0
        try:
            # A reply stopped early (Ctrl-C) is not remembered, nor is its question: the session goes on.
            _stream_reply(client, [{"role": "user", "content": line}], args)
        except KeyboardInterrupt:
            print()
        except LocalLLMKitError as exc:  # this message cannot be answered (too long...); the session goes on
            print(f"error: {exc}", file=sys.stderr)


def _port(value: str) -> int:
    """A TCP port, checked with the other flags, before any model loads."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {value!r}")
    return port


def _models(args: argparse.Namespace) -> int:
    # As run and chat do: the folder given, else LOCAL_LLM_KIT_MODEL_PATH's.
    rows = list_models(args.model_path if args.model_path is not None else os.environ.get(ENV_PREFIX + "MODEL_PATH"))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = "installed" if row["installed"] else f"not installed ({row['install']})"
        print(f"{row['name']:<28} {state:<20} {row['description']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from local_llm_kit.server import ServerLimits, check_bind, serve
    except ImportError as exc:
        from local_llm_kit.backends import install_command

        print(f"error: the server needs the 'server' extra ({exc.name} is missing): {install_command('server')}",
              file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get(ENV_PREFIX + "API_KEY") or None
    check_bind(args.host, api_key, args.allow_insecure_no_key)  # before minutes of loading
    try:
        limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                              max_tokens=args.max_tokens_limit, max_n=args.max_n, max_queue=args.max_queue)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    clients = []
    for name in args.model or [None]:
        client = AsyncLLMClient(name, model_path=args.model_path, backend=args.backend,
                                context_length=args.context_length, temperature=args.temperature,
                                top_p=args.top_p, n_threads=args.n_threads)
        _ = client.engine  # load now: fail before listening, not on the first request
        clients.append(client)
    print(f"Serving {', '.join(c.model for c in clients)} on http://{args.host}:{args.port}/v1 "
          f"({'API key required' if api_key else 'no API key'})", file=sys.stderr)
    serve(clients, host=args.host, port=args.port, api_key=api_key,
          allow_insecure_no_key=args.allow_insecure_no_key, limits=limits, log_level=args.log_level)
    return 0


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", action="append", default=None,
                        help="alias, GGUF file or model folder; repeat to serve several (the first is the default)")
    parser.add_argument("--model-path", default=None, help="weights to load, or a folder to search")
    parser.add_argument("--backend", default=None, choices=["llama.cpp", "transformers"])
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--n-threads", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="default when a request sets none")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="default when a request sets none")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=_port, default=8000, help="0 to 65535 (0: any free port)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' (default: {ENV_PREFIX}API_KEY)")
    parser.add_argument("--allow-insecure-no-key", action="store_true",
                        help="allow a non-loopback --host without an API key")
    parser.add_argument("--max-queue", type=int, default=32, help="requests waiting per model before 503")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--max-messages", type=int, default=1024)
    parser.add_argument("--max-tokens-limit", type=int, default=None,
                        help="largest max_tokens a request may ask for (default: the context length)")
    parser.add_argument("--max-n", type=int, default=4, help="most choices per request")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _version() -> str:
    from local_llm_kit import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="local-llm-kit", description="Local language models, OpenAI-style.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer one prompt")
    _client_options(run)
    run.add_argument("prompt")
    run.add_argument("--json", action="store_true", help="print the whole response as JSON")
    run.set_defaults(handler=_run)
    chat = sub.add_parser("chat", help="interactive chat")
    _client_options(chat)
    chat.set_defaults(handler=_chat)
    models = sub.add_parser("models", help="list packaged and found models")
    models.add_argument("--model-path", default=None)
    models.add_argument("--json", action="store_true")
    models.set_defaults(handler=_models)
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (extra 'server')")
    _serve_options(serve)
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # Model preparation (assembling a packaged model, converting a GGUF for transformers) can
    # take a while the first time: always say so on stderr.
    for name in ("local_llm_kit.models", "local_llm_kit.backends"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        return int(args.handler(args))
    except LocalLLMKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
