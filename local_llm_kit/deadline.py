"""A request's time limit and the thread a non-streamed async generation runs in.

``timeout`` in ``create()`` is a deadline on the whole request: when it passes, the cancel event
the decode loop checks before each token is set, and the request ends in
:class:`~local_llm_kit.errors.GenerationTimeoutError` rather than in a plain cancellation.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from local_llm_kit.errors import GenerationCancelledError, GenerationTimeoutError, InvalidRequestError

__all__ = ["Deadline", "in_thread", "timeout_of"]

_R = TypeVar("_R")
_T = TypeVar("_T")


def timeout_of(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidRequestError(f"timeout must be a positive number of seconds, got {value!r}", param="timeout")
    return float(value)


class Deadline:
    """Sets ``cancel`` when ``timeout`` seconds have passed; the decode loop stops before its next token."""

    def __init__(self, timeout: float | None, cancel: threading.Event) -> None:
        self.timeout = timeout
        self._expired = threading.Event()
        self._timer: threading.Timer | None = None
        if timeout is not None:
            def expire() -> None:
                self._expired.set()
                cancel.set()

            self._timer = threading.Timer(timeout, expire)
            self._timer.daemon = True
            self._timer.start()

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def error(self) -> GenerationTimeoutError:
        return GenerationTimeoutError(f"the request did not finish within its timeout of {self.timeout} s")

    def watch(self, chunks: Iterator[_T]) -> Iterator[_T]:
        """``chunks``, ending in :class:`GenerationTimeoutError` if the deadline cut them short."""
        try:
            yield from chunks
        finally:
            self.stop()
        if self.expired:
            raise self.error()

    def complete(self, function: Callable[..., _R], *args: Any) -> _R:
        try:
            return function(*args)
        except GenerationCancelledError:
            if self.expired:
                raise self.error() from None
            raise
        finally:
            self.stop()


def in_thread(function: Callable[..., _R], *args: Any) -> asyncio.Future[_R]:
    """Run ``function`` in a thread of its own and await it from the event loop.

    Not the loop's default executor: generations wait for the model there, and a handful of
    them would starve every other ``to_thread`` call of the application.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_R] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(outcome)

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # re-raised in the awaiting task
            error = exc
            settle(lambda: None if future.done() else future.set_exception(error))
        else:
            settle(lambda: None if future.done() else future.set_result(result))

    threading.Thread(target=run, name="local-llm-kit-generate", daemon=True).start()
    return future
