"""Incremental, UTF-8-safe detokenization and stop strings that span token boundaries."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["IncrementalDecoder", "StopStringMatcher"]


class IncrementalDecoder:
    """Bytes of tokens in, text out; a character split across tokens waits for its last byte."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopStringMatcher:
    """Holds back text that may be the start of a stop string, so a stop never leaks.

    ``push`` returns the text that is safe to emit and whether a stop string was completed;
    after a stop, the text before it has been emitted and everything from it on is dropped.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buffer = self._pending + text
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return buffer[:cut], True
        hold = self._longest_partial_stop(buffer)
        self._pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest

    def _longest_partial_stop(self, buffer: str) -> int:
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best
