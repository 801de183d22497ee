"""The OpenAI-compatible HTTP application (Starlette, served by uvicorn).

=====================================  ==================================================
``POST /v1/chat/completions``          everything ``create()`` supports; ``stream=true``
                                       answers with server-sent events ending ``[DONE]``
``GET  /v1/models``, ``/v1/models/ID``  the served models (with ``max_model_len``)
``POST /tokenize``                     exact prompt token count of ``messages`` (+ ``tools``,
                                       ``tool_choice``, ``response_format``...), request and
                                       answer shaped as vLLM's endpoint
``GET  /health``                       liveness, generating and waiting request counts
=====================================  ==================================================

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request (``param`` names the field), 401 for a missing or wrong key, 404 for an unknown model
or path, 413 for a body over the limit, 503 when the model's queue is full, 504 (with
``x-should-retry: false``, so that openai's client does not pay it again) when the request's own
``timeout`` passed. Bad input never produces a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from local_llm_kit.client import AsyncLLMClient
from local_llm_kit.errors import LocalLLMKitError
from local_llm_kit.params import PROMPT_SHAPING_PARAMETERS
from local_llm_kit.remote import create_parameter_names
from local_llm_kit.server.errors import APIError, error_from_exception, error_response
from local_llm_kit.server.events import EventStreamResponse
from local_llm_kit.server.limits import ServerLimits
from local_llm_kit.server.models import ServedModel, ServedModels, Slot

__all__ = ["create_app"]

T = TypeVar("T")
logger = logging.getLogger(__name__)

# The body fields of POST /v1/chat/completions: create()'s parameters. Anything else is
# refused with 400 naming it (create() refuses the unsupported ones it knows by name).
_CREATE_PARAMETERS = create_parameter_names()
_TOKENIZE_FIELDS = frozenset({"model", "messages", "tools", "add_generation_prompt", *PROMPT_SHAPING_PARAMETERS})

Handler = Callable[[Request], Awaitable[Response]]


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(models: AsyncLLMClient | Sequence[AsyncLLMClient], *, api_key: str | None = None,
               limits: ServerLimits | None = None) -> Starlette:
    """An ASGI app serving ``models`` (loaded or not; the first one is the default).

    ``api_key``: when set, every endpoint but ``/health`` needs ``Authorization: Bearer <key>``.
    """
    server = _Server(ServedModels([models] if isinstance(models, AsyncLLMClient) else list(models),
                                  (limits or ServerLimits()).max_queue),
                     api_key, limits or ServerLimits())
    routes = [
        Route("/v1/chat/completions", server.guard(server.chat_completions), methods=["POST"]),
        Route("/v1/models", server.guard(server.list_models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", server.guard(server.get_model), methods=["GET"]),
        Route("/tokenize", server.guard(server.tokenize), methods=["POST"]),
        Route("/health", server.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _internal_error},
                    middleware=[Middleware(_RequestId)])
    app.state.server = server
    return app


class _RequestId:
    """Every answer carries ``x-request-id`` (``req_`` and 32 hex digits), as OpenAI's do:
    openai-python shows it as ``._request_id`` (and in its errors) for logs and bug reports."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = (b"x-request-id", f"req_{uuid.uuid4().hex}".encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class _Server:
    def __init__(self, models: ServedModels, api_key: str | None, limits: ServerLimits) -> None:
        self.models = models
        self.limits = limits
        self._key = api_key.encode() if api_key else None

    # -- plumbing ------------------------------------------------------------------------------
    def guard(self, handler: Handler) -> Handler:
        """Check the key, then turn APIError and library errors into OpenAI-shaped answers."""

        async def guarded(request: Request) -> Response:
            try:
                self._authenticate(request)
                return await handler(request)
            except APIError as exc:
                return error_response(exc)

        return guarded

    def _authenticate(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Constant-time comparison: the answer's timing says nothing about the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _json_body(self, request: Request) -> dict[str, Any]:
        limit = self.limits.max_body_bytes
        too_large = APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        parts: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
        try:
            body = json.loads(b"".join(parts))
        except (ValueError, RecursionError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    # -- endpoints -----------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        body = await self._json_body(request)
        for name in body:
            if name not in _CREATE_PARAMETERS:
                raise APIError(400, f"unknown parameter {name!r}", param=name, code="unknown_parameter")
        self.limits.check(body)
        model = self.models.get(body.get("model"))
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise APIError(400, f"stream must be a boolean, got {stream!r}", param="stream", code="invalid_type")
        if body.get("messages") is None:
            raise APIError(400, "messages is required", param="messages", code="missing_required_parameter")
        arguments = {**body, "model": model.id}
        try:
            # A client that gives up while queued leaves the queue at once: otherwise its place
            # counts against max_queue until the model is free, and live requests get 503.
            slot = await _unless_disconnected(request, model.acquire(), release=model.release)
        except _ClientGone:
            return Response(status_code=499)
        handed_over = False  # once streaming, the response gives the slot back when it ends
        try:
            if stream:
                response = await self._start_stream(model, slot, arguments)
                handed_over = True
                return response
            completion = await _unless_disconnected(request, model.client.chat.completions.create(**arguments))
            return Response(completion.model_dump_json(), media_type="application/json")
        except _ClientGone:
            return Response(status_code=499)
        except LocalLLMKitError as exc:
            raise _as_api_error(exc) from exc
        finally:
            if not handed_over:
                model.release(slot)

    async def _start_stream(self, model: ServedModel, slot: Slot, arguments: dict[str, Any]) -> Response:
        """Start generating before answering, so that an error at the start gets a real status code."""
        stream = await model.client.chat.completions.create(**arguments)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await stream.aclose()
            raise
        return EventStreamResponse(stream, first, on_closed=lambda: model.release(slot))  # type: ignore[return-value]

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._describe(m) for m in self.models.models]})

    async def get_model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        model = self.models.by_id(model_id)
        if model is None:
            raise APIError(404, f"the model {model_id!r} is not served here", param="model", code="model_not_found")
        return JSONResponse(self._describe(model))

    def _describe(self, model: ServedModel) -> dict[str, Any]:
        return {"id": model.id, "object": "model", "created": model.created, "owned_by": "local-llm-kit",
                "max_model_len": model.client.engine.n_ctx}

    async def tokenize(self, request: Request) -> Response:
        """Exact prompt tokens of a conversation: what ``usage.prompt_tokens`` will say."""
        body = await self._json_body(request)
        for name in body:
            if name not in _TOKENIZE_FIELDS:
                raise APIError(400, f"unknown parameter {name!r} (this endpoint counts chat messages)",
                               param=name, code="unknown_parameter")
        if body.get("add_generation_prompt", True) is not True:
            raise APIError(400, "only add_generation_prompt=true is supported: counts are those of a "
                           "chat completion request", param="add_generation_prompt", code="invalid_value")
        self.limits.check(body)
        model = self.models.get(body.get("model"))
        if body.get("messages") is None:
            raise APIError(400, "messages is required", param="messages", code="missing_required_parameter")
        client = model.client
        try:
            shaping = {name: body[name] for name in PROMPT_SHAPING_PARAMETERS if body.get(name) is not None}
            count = await asyncio.to_thread(client.count_tokens, body["messages"], body.get("tools"), **shaping)
        except LocalLLMKitError as exc:
            raise _as_api_error(exc) from exc
        # "prompt_shaping": what the count applied beyond messages and tools, so that a client can
        # tell this count from that of a server that ignores what it does not know.
        return JSONResponse({"count": count, "max_model_len": client.engine.n_ctx,
                             "prompt_shaping": sorted(shaping)})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "generating": self.models.generating,
                             "waiting": self.models.waiting})


async def _unless_disconnected(request: Request, work: Awaitable[T],
                               release: Callable[[T], object] | None = None) -> T:
    """Await ``work``; if the client disconnects first, cancel it (generation stops at the next
    token) and raise :class:`_ClientGone`. ``release`` gives back what ``work`` got all the same,
    had it finished between the disconnect and the cancel."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, LocalLLMKitError, APIError):
        result = await task
        if release is not None:
            release(result)
    raise _ClientGone


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _as_api_error(exc: LocalLLMKitError) -> APIError:
    error = error_from_exception(exc)
    if error is not None:
        return error
    logger.error("request failed: %s", exc, exc_info=exc)
    return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error", code="server_error")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                   code=code))


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(APIError(500, "internal server error", type="server_error", code="server_error"))
