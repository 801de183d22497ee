"""Conversation memory: the remembered history of a client, kept within a token budget.

While memory is on, each ``create()`` sends the remembered history followed by the new
messages; after a successful call the new messages and the assistant's reply are remembered.
A call that fails (an exception, or a stream closed before its end) remembers nothing.

Trimming keeps the system message and drops the oldest whole *turns*: a turn starts at a user
message and runs to the next one, so an assistant's tool calls always stay with their tool
results. Budgets are counted in real model tokens (the chat template rendered and tokenized).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.sealed import SealedMessage

__all__ = ["ConversationMemory", "split_turns"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
Messages = list[dict[str, Any]]


def split_turns(messages: Sequence[dict[str, Any]]) -> tuple[Messages, list[Messages]]:
    """Leading system messages, and the rest grouped into turns that each start at a user message."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    turns: list[Messages] = []
    for message in messages[head:]:
        if message["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return list(messages[:head]), turns


def _sealed(messages: Sequence[dict[str, Any]]) -> Messages:
    """Memory's own copies of ``messages``, sealed: nothing changes them, so their snapshots
    are taken once (see :mod:`local_llm_kit.sealed`)."""
    return [SealedMessage(m) for m in copy.deepcopy(list(messages))]


class ConversationMemory:
    """Remembered messages of one client, trimmed to ``max_tokens`` model tokens."""

    def __init__(self, max_tokens: int, count_tokens: Callable[[Sequence[dict[str, Any]]], int]) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}",
                                      param="max_tokens")
        self.max_tokens = max_tokens
        self._count = count_tokens
        self._messages: Messages = []
        self._lock = threading.RLock()
        self.trimmed_total = 0
        """Messages dropped by trimming since memory was enabled."""

    @property
    def messages(self) -> Messages:
        with self._lock:
            return copy.deepcopy(self._messages)

    def token_count(self) -> int:
        with self._lock:
            return self._count(self._messages) if self._messages else 0

    def __len__(self) -> int:
        return len(self._messages)

    def add(self, messages: Sequence[dict[str, Any]]) -> int:
        """Remember ``messages`` (already validated); trim to the budget; return how many were trimmed.

        A system message among them replaces the remembered one and goes to the front.
        """
        with self._lock:
            new = _sealed(messages)
            new_system = [m for m in new if m["role"] == "system"]
            if new_system:
                _, turns = split_turns(self._messages)
                self._messages = new_system + [m for turn in turns for m in turn]
            self._messages.extend(m for m in new if m["role"] != "system")
            return self._trim_to_budget()

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def snapshot(self) -> Messages:
        """The remembered messages themselves (sealed: see :mod:`local_llm_kit.sealed`), in a new list."""
        with self._lock:
            return list(self._messages)

    def turns(self) -> tuple[Messages, list[Messages]]:
        """The leading system messages and the remembered turns (see :func:`split_turns`)."""
        with self._lock:
            return split_turns(self._messages)

    def candidates(self) -> Iterator[Messages]:
        """The history to send, from whole to most trimmed (system message always kept).

        Built one at a time: a prompt that fits the context takes only the first.
        """
        system, turns = self.turns()
        for drop in range(len(turns) + 1):
            yield system + [m for turn in turns[drop:] for m in turn]

    def _trim_to_budget(self) -> int:
        if not self._messages or self._count(self._messages) <= self.max_tokens:
            return 0  # the common case: counted once, no need to split the history into turns
        system, turns = split_turns(self._messages)
        dropped = 0
        while turns:
            dropped += len(turns.pop(0))
            self._messages = system + [m for turn in turns for m in turn]
            if self._count(self._messages) <= self.max_tokens:
                break
        if dropped:
            self.trimmed_total += dropped
            logger.info("memory: trimmed %d oldest messages to stay within %d tokens", dropped, self.max_tokens)
        return dropped

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        with self._lock:
            payload = {"version": FORMAT_VERSION, "max_tokens": self.max_tokens, "messages": self._messages}
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(json.dumps(payload, ensure_ascii=False, indent=2), encoding="utf-8")
        os.replace(partial, target)  # never leave a half-written file under the real name

    @staticmethod
    def read(path: str | os.PathLike[str]) -> tuple[int, list[Any]]:
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidRequestError(f"cannot read memory from {path}: {exc}", param="path") from exc
        if not isinstance(payload, dict) or payload.get("version") != FORMAT_VERSION \
                or not isinstance(payload.get("messages"), list):
            raise InvalidRequestError(f"{path} is not a local_llm_kit memory file (version {FORMAT_VERSION})",
                                      param="path")
        return int(payload.get("max_tokens", 1000)), payload["messages"]

    def replace(self, messages: Sequence[dict[str, Any]]) -> int:
        with self._lock:
            self._messages = _sealed(messages)
            return self._trim_to_budget()
