"""``client.chat.completions`` of a ``backend="openai"`` client: memory around a forwarded request."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from local_llm_kit.client import AsyncCompletions, Completions
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.remote._errors import ContextOverflow
from local_llm_kit.remote._request import RemoteCall, prepare_call
from local_llm_kit.remote._sse import close_on_collect, iter_chunks, parse_completion
from local_llm_kit.remote._transport import RemoteEndpoint
from local_llm_kit.request import normalize_messages
from local_llm_kit.streaming import AsyncStream, ReplyCollector, Stream
from local_llm_kit.types import CompletionChunk, Message

__all__ = ["AsyncRemoteCompletions", "RemoteCompletions", "count_tokens"]

logger = logging.getLogger("local_llm_kit.remote")


class _RemoteMixin:
    """What the sync and async remote ``completions`` share: everything but the sending.

    ``create()`` is, for both: prepare the call; send the first body, or with memory a shorter
    one when the server answers that the previous one does not fit; :meth:`_finish` the answer.
    """

    _client: Any
    _endpoint: RemoteEndpoint

    def _bodies(self, call: RemoteCall) -> list[dict[str, Any]]:
        """The body to send, then (with memory) ones with fewer remembered turns, oldest dropped first.

        The server's context length is the server's business: a body is only replaced by a
        shorter one when the server answers that it does not fit.
        """
        memory = self._client._memory
        if memory is None:
            return [call.body]
        new = list(call.request.messages)
        replaces_system = any(m["role"] == "system" for m in new)
        if replaces_system:
            new = [m for m in new if m["role"] == "system"] + [m for m in new if m["role"] != "system"]
        bodies = []
        for history in memory.candidates():
            if replaces_system:
                history = [m for m in history if m["role"] != "system"]
            bodies.append({**call.body, "messages": history + new})
        return bodies

    @staticmethod
    def _may_shorten(exc: InvalidRequestError, attempt: int, bodies: Sequence[dict[str, Any]]) -> bool:
        """Whether ``exc`` (the answer to ``bodies[attempt]``) means: try the next, shorter body."""
        if isinstance(exc, ContextOverflow) and attempt + 1 < len(bodies):
            logger.info("memory: leaving out the %d oldest turns to fit the server's context", attempt + 1)
            return True
        return False

    def _finish(self, call: RemoteCall, answer: httpx.Response | dict[str, Any]) -> Any:
        """The stream over an accepted streaming request, or the completion of a whole answer."""
        if isinstance(answer, httpx.Response):
            return self._stream(answer, call)
        completion = parse_completion(answer, self._endpoint.base_url)
        self._remember(call.new_messages, completion.choices[0].message)
        return completion

    def _stream(self, response: httpx.Response, call: RemoteCall) -> Any:
        raise NotImplementedError

    def _remember(self, new_messages: Sequence[dict[str, Any]], reply: Message) -> None:
        memory = self._client._memory
        if memory is not None:
            # Only what a later request may send back: a server's extra fields stay out.
            kept = Message(content=reply.content, tool_calls=reply.tool_calls, function_call=reply.function_call)
            memory.add([*new_messages, *normalize_messages([kept.model_dump(exclude_none=True)])])


class RemoteCompletions(_RemoteMixin, Completions):
    """``client.chat.completions`` of an ``LLMClient(backend="openai")``."""

    def __init__(self, client: Any, endpoint: RemoteEndpoint) -> None:
        super().__init__(client)
        self._endpoint = endpoint

    def create(self, *, stream: bool = False, **params: Any) -> Any:
        """Validate as the in-process client does, forward, and return our response types."""
        call = prepare_call(self._endpoint, self._client.settings, stream, params)
        bodies = self._bodies(call)
        for attempt, body in enumerate(bodies):
            try:
                answer = self._send(body, call)
            except InvalidRequestError as exc:
                if self._may_shorten(exc, attempt, bodies):
                    continue
                raise
            return self._finish(call, answer)
        raise AssertionError("unreachable: the last body's error is raised")

    def _send(self, body: dict[str, Any], call: RemoteCall) -> httpx.Response | dict[str, Any]:
        if call.request.stream:
            return self._endpoint.open_stream(body, **call.http)
        return self._endpoint.request("POST", self._endpoint.base_url + "/chat/completions", body, **call.http)

    def _stream(self, response: httpx.Response, call: RemoteCall) -> Stream[CompletionChunk]:
        collector = ReplyCollector()
        cancel = threading.Event()
        stream = Stream(collector.watch(iter_chunks(response, cancel)), cancel=cancel,
                        on_complete=lambda: self._remember(call.new_messages, collector.message()))
        close_on_collect(stream, response)
        return stream


class AsyncRemoteCompletions(_RemoteMixin, AsyncCompletions):
    """``client.chat.completions`` of an ``AsyncLLMClient(backend="openai")``."""

    def __init__(self, client: Any, endpoint: RemoteEndpoint) -> None:
        super().__init__(client)
        self._endpoint = endpoint

    async def create(self, *, stream: bool = False, **params: Any) -> Any:
        """:meth:`RemoteCompletions.create` on the event loop."""
        # Naming the model may ask the server (GET /models) once: off the event loop.
        call = await asyncio.to_thread(prepare_call, self._endpoint, self._client.settings, stream, params)
        bodies = self._bodies(call)
        for attempt, body in enumerate(bodies):
            try:
                answer = await self._send(body, call)
            except InvalidRequestError as exc:
                if self._may_shorten(exc, attempt, bodies):
                    continue
                raise
            return self._finish(call, answer)
        raise AssertionError("unreachable: the last body's error is raised")

    async def _send(self, body: dict[str, Any], call: RemoteCall) -> httpx.Response | dict[str, Any]:
        if call.request.stream:
            return await _open_off_loop(self._endpoint, body, call)
        return await self._endpoint.arequest(body, **call.http)

    def _stream(self, response: httpx.Response, call: RemoteCall) -> AsyncStream[CompletionChunk]:
        collector = ReplyCollector()
        chunks: AsyncStream[CompletionChunk] = AsyncStream(
            lambda cancel: collector.watch(iter_chunks(response, cancel)),
            on_complete=lambda: self._remember(call.new_messages, collector.message()))
        close_on_collect(chunks, response)
        return chunks


async def _open_off_loop(endpoint: RemoteEndpoint, body: dict[str, Any], call: RemoteCall) -> httpx.Response:
    """Open a stream in a thread; if the caller is cancelled meanwhile, close it once it opens."""
    opening = asyncio.ensure_future(asyncio.to_thread(endpoint.open_stream, body, **call.http))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        def close(done: asyncio.Future[httpx.Response]) -> None:
            if not done.cancelled() and done.exception() is None:
                done.result().close()

        opening.add_done_callback(close)
        raise


def count_tokens(client: Any, endpoint: RemoteEndpoint, messages: Any, tools: Any, params: Mapping[str, Any]) -> int:
    """``client.count_tokens`` over the server: exactly the ``prompt_tokens`` of the same request."""
    call = prepare_call(endpoint, client.settings, False, {**params, "messages": messages, "tools": tools})
    return endpoint.count_tokens(call.body)
