"""Messages that no longer change, snapshotted once: the remembered history of a conversation.

The prompt encoder keys its memos by an immutable snapshot of every message of a conversation
(:class:`local_llm_kit.encoding.PromptEncoder`). A plain dict can change between two requests,
so it is snapshotted again on each: for a long history that is the largest cost left on the
request path that grows with the history, paid twice a turn (the prompt, then memory's count
after the reply). Memory owns copies of its messages that nothing changes; it keeps them as
:class:`SealedMessage`, which takes its snapshot once and refuses to change afterwards, so
the snapshot cannot go stale. Snapshots of equal messages are equal, sealed or not, so a
conversation hits the same memo entries whether it comes from memory or from a caller's dicts.

A sealed message reads as the plain dict it was made from; copying it (``copy.copy``,
``copy.deepcopy``, ``dict(message)``) gives a plain dict, which may be changed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any, NoReturn

__all__ = ["SealedMessage", "Snapshot", "snapshot"]

Snapshot = tuple[Any, int]
"""A message's immutable stand-in and its hash: its items, or its JSON text where they do not hash."""


def snapshot(message: Mapping[str, Any]) -> Snapshot:
    """An immutable snapshot of ``message``, to tell whether it was seen before, and its hash.

    Raises ``TypeError`` or ``ValueError`` for a message that does not serialize.
    """
    if type(message) is SealedMessage:
        return message.snapshot
    return _take(message)


def _take(message: Mapping[str, Any]) -> Snapshot:
    items = tuple(message.items())
    try:
        return items, hash(items)  # str, numbers, None: the common message
    except TypeError:  # lists and dicts (tool calls)
        text = json.dumps(message, sort_keys=True)
        return text, hash(text)


class SealedMessage(dict[str, Any]):
    """A message dict that refuses changes, with its :func:`snapshot` taken when sealed.

    Nested values (a reply's ``tool_calls``) are the sealer's to leave alone: memory seals its
    own deep copies. Raises what :func:`snapshot` raises for a message that does not serialize.
    """

    __slots__ = ("snapshot",)

    def __init__(self, message: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.snapshot: Snapshot = _take(self)

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a remembered message cannot be changed; change a copy (dict(message)) instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore[assignment]

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return copy.deepcopy(dict(self), memo)

    def __reduce__(self) -> tuple[Any, ...]:
        return dict, (dict(self),)
