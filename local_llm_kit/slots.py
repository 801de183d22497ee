"""Which KV-cache slot a generation uses: the multi-slot prefix cache's policy.

A backend keeps ``n_slots`` cached sequences (see :mod:`local_llm_kit.backends.base`). For each
generation the engine picks one:

1. the slot sharing the longest prefix with the prompt (ties: the most recently used), if
   either that prefix reaches past the prompt the slot last served (the prompt is the next
   turn of the conversation in that slot, or the same prompt again; a reply re-tokenized
   differently diverges only after the old prompt), or it is at least half of what the slot
   holds (a branch of that conversation: another question about the same long document, an
   edited last message);
2. otherwise an empty slot;
3. otherwise the least recently used slot.

Rule 1's conditions are what keep conversations that merely share a system prompt from evicting
each other: they diverge early in the other slot's prompt, so the second one goes to another
slot (its shared prefix is evaluated once more) instead of truncating the first one's history.
Conversations sharing more than half their length (a long common tool list, say) do share a
slot, and then re-evaluate their own tails on every switch.

A slot is *pinned* by the generation ticket that chose it until the ticket is released (see
:mod:`local_llm_kit.lease`): a generation that borrows the model from an idle ticket holder
never gets the holder's slot while another one is free, so the holder resumes on its cache as
it left it. Only when every slot is pinned does a generation share one; that is still correct
(the decode loop re-evaluates its prefix when another generation used its slot), just slower.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

__all__ = ["SlotTable", "choose_slot", "common_prefix_length"]


class _Ticket(Protocol):
    released: bool


# The first slice compared (see common_prefix_length), and how much each next one grows.
_FIRST_CHUNK = 64
_GROWTH = 8


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share.

    Compared as list slices (C-level loops), since a warm turn compares thousands of cached
    tokens with the prompt, for every slot, on the request path. The slices grow from a short
    first one: a slot holding another conversation differs within its first few dozen tokens
    (after a shared system message) and costs no copy of the history, and the slot that holds
    this one is compared in a few slices.
    """
    n = min(len(a), len(b))
    a_list, b_list = list(a) if not isinstance(a, list) else a, list(b) if not isinstance(b, list) else b
    start, size = 0, _FIRST_CHUNK
    while start < n:
        end = min(n, start + size)
        if a_list[start:end] != b_list[start:end]:
            i = start
            while a_list[i] == b_list[i]:
                i += 1
            return i
        start, size = end, size * _GROWTH
    return n


def choose_slot(prompt: Sequence[int], slots: Sequence[Sequence[int]], last_used: Sequence[int],
                allowed: Sequence[int], served: Sequence[int] | None = None) -> int:
    """The slot (one of ``allowed``) a prompt should use; see the module docstring.

    ``slots`` are the token ids each slot holds, ``last_used`` when each was last chosen (larger
    is later) and ``served`` the length of the prompt each last served (0 where unknown).
    """
    if not allowed:
        raise ValueError("no slot to choose from")
    best, best_common = -1, 0
    for index in allowed:
        common = common_prefix_length(slots[index], prompt)
        boundary = min(served[index] if served is not None else 0, len(slots[index]))
        if common == 0 or (common < boundary and 2 * common < len(slots[index])):
            continue  # nothing shared, or another conversation that shares only a beginning
        if common > best_common or (common == best_common and last_used[index] > last_used[best]):
            best, best_common = index, common
    if best >= 0:
        return best
    empty = [index for index in allowed if not slots[index]]
    if empty:
        return empty[0]
    return min(allowed, key=lambda index: last_used[index])


class SlotTable:
    """Recency and pins of one backend's slots (thread-safe)."""

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self._last_used = [0] * n_slots
        self._served = [0] * n_slots
        self._pins: dict[int, _Ticket] = {}
        self._clock = 0
        self._lock = threading.Lock()

    def choose(self, prompt: Sequence[int], slots: Sequence[Sequence[int]], ticket: _Ticket | None) -> int:
        """Pick the slot for ``prompt`` on behalf of ``ticket`` and pin it to that ticket.

        ``slots`` are the token ids each slot holds now; the caller holds the model's step lock,
        so they do not change meanwhile.
        """
        with self._lock:
            pinned = {index for index, holder in self._pins.items()
                      if holder is not ticket and not holder.released}
            allowed = [index for index in range(self.n_slots) if index not in pinned] or list(range(self.n_slots))
            index = choose_slot(prompt, slots, self._last_used, allowed, self._served)
            self._clock += 1
            self._last_used[index] = self._clock
            self._served[index] = len(prompt)
            if ticket is not None:
                self._pins[index] = ticket
            else:
                self._pins.pop(index, None)
            return index
