"""Who may use a loaded model, and when: one generation at a time, whatever thread advances it.

A model has one KV cache, so one generation at a time should own it. A stream, though, is a
generation that pauses between chunks, and the thread that resumes it need not be the one that
started it (Starlette pulls a sync iterator from pool threads; an async stream's producer runs
in a worker thread). A re-entrant lock tied to a thread cannot describe that. So ownership is
split in two, neither of them tied to a thread:

* a :class:`Ticket` per generation, taken before its first token and given back when it ends,
  is closed, or is dropped; a later generation waits for the ticket's holder to finish, which is
  what keeps the holder's prefix in the KV cache (interleaving two long prompts token by token
  would re-evaluate each prompt on every switch);
* the step lock, held only while a generation actually touches the backend (from the forward
  pass to the sampled token), never across a ``yield``: it is what makes concurrent use safe.

A holder that sits idle between steps for longer than :data:`BORROW_AFTER_S` seconds (a consumer
that stopped reading, a stream dropped but not yet collected, a thread that opened a stream and
then sent another request before finishing it) lets waiting generations *borrow* the model. That
is always correct, because the decode loop notices that another generation used the cache and
rebuilds its own prefix; it only costs the idle holder a re-evaluation when it resumes. It turns
what would be a deadlock (the next request waits for a stream that waits for the next request)
into a slower stream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from local_llm_kit.errors import ModelUnloadedError

__all__ = ["BORROW_AFTER_S", "ModelLease", "Ticket"]

BORROW_AFTER_S = 0.5
"""How long a ticket holder may sit between steps before waiting generations borrow the model."""

_POLL_S = 0.05


class Ticket:
    """One generation's right to use the model (see the module docstring)."""

    __slots__ = ("_lease", "borrowed", "idle_since", "released")

    def __init__(self, lease: ModelLease, *, borrowed: bool) -> None:
        self._lease = lease
        self.borrowed = borrowed
        self.idle_since: float | None = time.monotonic()
        self.released = False

    def ensure_open(self) -> None:
        """Raise :class:`ModelUnloadedError` once the model is being unloaded. A non-streamed reply
        holds one step from its first token to its last, so it asks between tokens: unloading
        waits for the step in progress, and would otherwise wait for the whole reply."""
        if self._lease.closed:
            raise ModelUnloadedError(
                "the model was unloaded during this generation (unload_all() or the last client's "
                "close()); send the request again to load it anew"
            )

    @contextmanager
    def step(self) -> Iterator[None]:
        """Hold the model for one step of work (a prefill, a token, a whole non-streamed reply)."""
        lease = self._lease
        self.idle_since = None
        try:
            with lease.step_lock:
                self.ensure_open()
                yield
        finally:
            self.idle_since = time.monotonic()

    def release(self) -> None:
        """Give the model back (idempotent; any thread may call it)."""
        self._lease._release(self)


class ModelLease:
    """Generation tickets and the step lock of one loaded model."""

    def __init__(self) -> None:
        self.step_lock = threading.Lock()
        self.closed = False
        self._cond = threading.Condition(threading.Lock())
        self._holder: Ticket | None = None
        self._readers = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Use the model's tokenizer and metadata (no KV cache): any number at once, never during close."""
        with self._cond:
            if self.closed:
                raise ModelUnloadedError("the model was unloaded; send the request again to load it anew")
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    def acquire(self, cancel: threading.Event | None = None) -> Ticket | None:
        """Wait until this generation may run; ``None`` if ``cancel`` was set while waiting."""
        with self._cond:
            while True:
                if self.closed:
                    raise ModelUnloadedError(
                        "the model was unloaded while this request waited for it; send it again to load it anew"
                    )
                if cancel is not None and cancel.is_set():
                    return None
                holder = self._holder
                if holder is None:
                    self._holder = Ticket(self, borrowed=False)
                    return self._holder
                idle_since = holder.idle_since
                if idle_since is not None and time.monotonic() - idle_since >= BORROW_AFTER_S:
                    return Ticket(self, borrowed=True)
                self._cond.wait(_POLL_S)

    @contextmanager
    def generation(self, cancel: threading.Event | None = None) -> Iterator[Ticket | None]:
        """A ticket for the duration of the ``with`` block (``None`` if cancelled while waiting)."""
        ticket = self.acquire(cancel)
        try:
            yield ticket
        finally:
            if ticket is not None:
                ticket.release()

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.released:
                return
            ticket.released = True
            if self._holder is ticket:
                self._holder = None
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        """Whether a generation holds the model now."""
        with self._cond:
            return self._holder is not None

    def close(self, release_resources: Callable[[], None]) -> None:
        """Refuse new work, wait for the step in progress (if any), then release the model."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            while self._readers:
                self._cond.wait()
        with self.step_lock:
            release_resources()
