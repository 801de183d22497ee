"""A streamed completion as server-sent events, stopped as soon as its client goes away.

The response watches the connection while it sends: when the client disconnects, sending
stops and the stream is closed, which stops generation before its next token. The
generation slot is given back only after the stream's worker has stopped, so "nothing is
generating" is true when the server's counters say so.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from local_llm_kit.server.errors import APIError, error_body, error_from_exception
from local_llm_kit.streaming import AsyncStream
from local_llm_kit.types import CompletionChunk

__all__ = ["EventStreamResponse", "sse_event"]

logger = logging.getLogger(__name__)

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies must not hold events back
]
DONE = b"data: [DONE]\n\n"


def sse_event(payload: str) -> bytes:
    return b"data: " + payload.encode() + b"\n\n"


class EventStreamResponse:
    """An ASGI response for one stream; ``on_closed`` runs once the stream is fully stopped."""

    def __init__(self, stream: AsyncStream[CompletionChunk], first: CompletionChunk | None,
                 on_closed: Callable[[], None]) -> None:
        self._stream = stream
        self._first = first
        self._on_closed = on_closed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            sender = asyncio.ensure_future(self._send_all(send))
            watcher = asyncio.ensure_future(_until_disconnected(receive))
            done, pending = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if sender in done and not sender.cancelled() and sender.exception() is not None:
                # Writing to a connection that just closed: the client is gone, nothing to report.
                logger.debug("stream ended by a send failure: %r", sender.exception())
            elif watcher in done:
                logger.info("client disconnected mid-stream; generation stopped")
        finally:
            try:
                await self._stream.aclose()
            finally:
                self._on_closed()

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        if self._first is not None:
            await _send_body(send, sse_event(self._first.model_dump_json()))
        while True:
            try:
                chunk = await self._stream.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:
                # Headers are gone already: the error travels as an event, as OpenAI's API does.
                error = error_from_exception(exc)
                if error is None:
                    logger.exception("generation failed mid-stream")
                    error = APIError(500, f"generation failed: {exc}", type="server_error", code="server_error")
                await _send_body(send, sse_event(json.dumps(error_body(error))), more=False)
                return
            # A failure to send means the client is gone: it propagates and ends the response.
            await _send_body(send, sse_event(chunk.model_dump_json()))
        await _send_body(send, DONE, more=False)


async def _send_body(send: Send, data: bytes, more: bool = True) -> None:
    message: dict[str, Any] = {"type": "http.response.body", "body": data, "more_body": more}
    await send(message)


async def _until_disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
