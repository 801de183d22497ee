"""Streams of completion chunks: iterators and context managers whose ``close()`` stops work.

:class:`Stream` computes each chunk in the thread that asks for it, and any thread may ask (one
at a time): Starlette's ``StreamingResponse`` pulls a sync iterator from pool threads. Closing
it, leaving its ``with`` block or dropping it stops generation before the next token and gives
the model back (:mod:`local_llm_kit.lease`), even when another thread is advancing it right then.

:class:`AsyncStream` runs the decode loop in a worker thread of its own, off the event loop, and
hands chunks over through a small bounded queue: a consumer that stops reading stops the worker
(backpressure) instead of letting it decode on into memory. Closing the stream, cancelling the
task that iterates it, or dropping it stops the worker before its next token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from local_llm_kit.types import CompletionChunk, FunctionCall, Message, ToolCall

__all__ = ["AsyncStream", "ReplyCollector", "Stream"]

T = TypeVar("T")
_DONE = object()

QUEUE_CHUNKS = 16
"""Chunks an :class:`AsyncStream`'s worker may compute ahead of its consumer."""

_POLL_S = 0.05


class Stream(Generic[T]):
    """A sync iterator of chunks; ``close()`` (or ``with``, or dropping it) stops generation."""

    def __init__(self, source: Iterator[T], *, cancel: threading.Event | None = None,
                 on_complete: Callable[[], None] | None = None) -> None:
        self._source = source
        self._cancel = cancel if cancel is not None else threading.Event()
        self._on_complete = on_complete
        self._advance = threading.Lock()  # one thread computes the next chunk at a time
        self._closed = False
        # Set by close() only. ``cancel`` is shared with the request's deadline, whose expiry
        # must end the stream with its timeout error, raised by the source, not silently here.
        self._close_requested = False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        with self._advance:
            if self._closed:
                raise StopIteration
            try:
                item = next(self._source)
            except StopIteration:
                completed = not self._cancel.is_set()
                self._shutdown()
                if completed and self._on_complete is not None:
                    self._on_complete()
                raise
            except BaseException:
                self._shutdown()
                raise
            if self._close_requested:  # closed by another thread while this chunk was computed
                self._shutdown()
            return item

    def close(self) -> None:
        """Stop generation now; chunks not yet produced are never computed. Any thread may call it."""
        self._close_requested = True
        self._cancel.set()
        if self._advance.acquire(blocking=False):
            try:
                self._shutdown()
            finally:
                self._advance.release()
        # Otherwise another thread is computing a chunk: it sees the cancel flag before the next
        # token, and shuts the source down before returning.

    def _shutdown(self) -> None:
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
        # Dropped without close(): give the model back now, not when a cycle collector runs.
        if not getattr(self, "_closed", True):
            self.close()


def _produce(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], cancel: threading.Event,
             gone: threading.Event, make_source: Callable[[threading.Event], Iterator[Any]]) -> None:
    """The worker thread of an :class:`AsyncStream`.

    ``cancel`` stops generation (the consumer left, or a deadline passed: the source then ends
    with an error that is still handed over); ``gone`` says nobody will read any more. The worker
    holds no reference to the stream, so a stream its consumer dropped is collected, and the
    stream's finalizer sets both.
    """

    def hand_over(item: object) -> bool:
        """Put ``item`` in the queue, waiting for room; False once nobody will read it."""
        try:
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        except RuntimeError:  # the event loop is closed
            gone.set()
        else:
            while not gone.is_set():
                try:
                    future.result(timeout=_POLL_S)
                    return True
                except concurrent.futures.TimeoutError:
                    if loop.is_closed():
                        gone.set()
                except concurrent.futures.CancelledError:
                    gone.set()
            future.cancel()
        cancel.set()
        return False

    source: Iterator[Any] | None = None
    try:
        source = make_source(cancel)
        for item in source:
            if gone.is_set() or not hand_over(item):
                break
    except BaseException as exc:  # handed to the consumer, raised there
        hand_over(exc)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
        if not gone.is_set():
            hand_over(_DONE)


class AsyncStream(Generic[T]):
    """An async iterator of chunks produced by a worker thread (see the module docstring)."""

    def __init__(self, make_source: Callable[[threading.Event], Iterator[T]],
                 on_complete: Callable[[], None] | None = None) -> None:
        self._make_source = make_source
        self._on_complete = on_complete
        self._cancel = threading.Event()
        self._gone = threading.Event()
        self._queue: asyncio.Queue[object] | None = None
        self._worker: threading.Thread | None = None
        self._closed = False

    def _start(self) -> asyncio.Queue[object]:
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        self._worker = threading.Thread(
            target=_produce, args=(asyncio.get_running_loop(), queue, self._cancel, self._gone, self._make_source),
            name="local-llm-kit-stream", daemon=True,
        )
        self._worker.start()
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
        """Stop generation: the worker returns before computing another token, and gives the model back."""
        self._closed = True
        self._gone.set()
        self._cancel.set()
        worker = self._worker
        if worker is not None and worker.is_alive():
            # Waiting in a thread keeps the event loop free; the worker stops within a token.
            await asyncio.to_thread(worker.join)

    async def close(self) -> None:
        """The same as :meth:`aclose` (openai's ``AsyncStream.close()``)."""
        await self.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped without aclose(): the worker sees the flag before its next token and exits.
        for flag in (getattr(self, "_gone", None), getattr(self, "_cancel", None)):
            if flag is not None:
                flag.set()


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
