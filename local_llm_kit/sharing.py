"""What a client shares with the clients made from it by ``as_async()`` / ``as_sync()``.

Code that needs both interfaces over one model (a framework adapter) makes the second client from
the first instead of configuring another one: see :meth:`LLMClient.as_async`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from local_llm_kit.errors import ClientClosedError

if TYPE_CHECKING:
    from local_llm_kit.client import _BaseClient
    from local_llm_kit.engine import Engine
    from local_llm_kit.memory import ConversationMemory

__all__ = ["Shared", "sibling"]

_C = TypeVar("_C", bound="_BaseClient")


class Shared:
    """The engine hold and the memory of a client and of its siblings.

    One hold on the loaded engine for them all: it is attached once and detached when the last
    of them closes (then the usual rule applies: the last holder of a model unloads it). One
    conversation memory: enabling, adding to, clearing or disabling it on one is seen by all, and
    its tokens are counted by whichever of them is still open.
    """

    def __init__(self, first: _BaseClient) -> None:
        self.lock = threading.Lock()
        self.engine: Engine | None = None
        self.memory: ConversationMemory | None = None
        self.open = 1  # open clients sharing this (see _BaseClient._close)
        self.clients: list[weakref.ref[_BaseClient]] = [weakref.ref(first)]

    def count_history(self, messages: Sequence[dict[str, Any]]) -> int:
        """The memory's token counter: counted by the first client still open."""
        for ref in list(self.clients):
            client = ref()
            if client is not None and not client.closed:
                return client._count_history(messages)
        raise ClientClosedError("every client sharing this memory is closed; create a new client")


def sibling(source: _BaseClient, cls: type[_C]) -> _C:
    """A client of class ``cls`` sharing ``source``'s settings, engine hold and memory."""
    shared = source._shared
    made = cls.__new__(cls)
    with shared.lock:
        if source.closed:
            raise ClientClosedError("this client is closed; create a new client")
        # Every attribute (settings, resolved model, the Shared...) is the source's; then what each
        # client owns alone: its open state, its connections, its chat resource.
        made.__dict__.update(source.__dict__)
        made._closed = False
        made._remote = source._remote.copy() if source._remote is not None else None
        shared.open += 1
        shared.clients = [*(ref for ref in shared.clients if ref() is not None), weakref.ref(made)]
    made._open_chat()
    return made
