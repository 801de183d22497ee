"""Streams of completion chunks: iterators and context managers whose ``close()`` stops work.

:class:`Stream` pulls chunks from the decode loop in the consumer's thread, so closing it (or
leaving its ``with`` block, or dropping it) stops generation before the next token.
:class:`AsyncStream` runs the decode loop in a worker thread, off the event loop; closing the
stream or cancelling the task that iterates it stops that thread before its next token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Generic, TypeVar

from local_llm_kit.types import CompletionChunk, FunctionCall, Message, ToolCall

__all__ = ["AsyncStream", "ReplyCollector", "Stream"]

T = TypeVar("T")
_DONE = object()


class Stream(Generic[T]):
    def __init__(self, source: Iterator[T], on_complete: Callable[[], None] | None = None) -> None:
        self._source = source
        self._on_complete = on_complete
        self._closed = False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        try:
            return next(self._source)
        except StopIteration:
            self._closed = True
            if self._on_complete is not None:
                self._on_complete()
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop generation now; chunks not yet produced are never computed."""
        if not self._closed:
            self._closed = True
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class AsyncStream(Generic[T]):
    def __init__(self, make_source: Callable[[threading.Event], Iterator[T]],
                 on_complete: Callable[[], None] | None = None) -> None:
        self._make_source = make_source
        self._on_complete = on_complete
        self._cancel = threading.Event()
        self._queue: asyncio.Queue[object] | None = None
        self._task: asyncio.Future[None] | None = None
        self._closed = False

    def _start(self) -> asyncio.Queue[object]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def produce() -> None:
            source = self._make_source(self._cancel)
            try:
                for item in source:
                    if self._cancel.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        self._task = asyncio.ensure_future(asyncio.to_thread(produce))
        return queue

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed:
            raise StopAsyncIteration
        if self._queue is None:
            self._queue = self._start()
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled while waiting: stop the worker too
            await self.aclose()
            raise
        if item is _DONE:
            self._closed = True
            if not self._cancel.is_set() and self._on_complete is not None:
                self._on_complete()
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            await self.aclose()
            raise item
        return item  # type: ignore[return-value]

    async def aclose(self) -> None:
        """Stop generation: the worker thread returns before computing another token."""
        self._closed = True
        self._cancel.set()
        if self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        await self.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class ReplyCollector:
    """Rebuilds the first choice's complete message from a stream's chunks (for memory)."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._calls: dict[int, dict[str, str]] = {}
        self._function: dict[str, str] | None = None

    def watch(self, chunks: Iterator[CompletionChunk]) -> Iterator[CompletionChunk]:
        try:
            for chunk in chunks:
                for choice in chunk.choices:
                    if choice.index == 0:
                        self._add(choice.delta)
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def _add(self, delta: object) -> None:
        content = getattr(delta, "content", None)
        if content:
            self._content.append(content)
        for call in getattr(delta, "tool_calls", None) or ():
            entry = self._calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] = call.id or entry["id"]
            if call.function is not None:
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
        function = getattr(delta, "function_call", None)
        if function is not None:
            self._function = self._function or {"name": "", "arguments": ""}
            self._function["name"] += function.name or ""
            self._function["arguments"] += function.arguments or ""

    def message(self) -> Message:
        tool_calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                      for _, c in sorted(self._calls.items())] or None
        function_call = FunctionCall(**self._function) if self._function else None
        content = "".join(self._content)
        return Message(content=content if content or not (tool_calls or function_call) else None,
                       tool_calls=tool_calls, function_call=function_call)
