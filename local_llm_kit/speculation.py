"""Prompt-lookup drafting: guess the next tokens by finding the latest n-gram again in the text.

Agent and RAG replies often copy spans of their input: tool arguments built from the question,
quoted passages, JSON filled from a document. When the last few tokens of the sequence (prompt
and reply so far) occurred earlier, the tokens that followed them then are a cheap guess of what
follows now. The decode loop evaluates the guess in the same forward pass as the token it has
just chosen and keeps the longest prefix the sampler would have produced anyway, so the output is
exactly the one decoding without drafts gives (see :func:`local_llm_kit.decoding.generate`); only
the number of forward passes changes.

No draft model, no training: the cost is a vectorized n-gram search per step (tens of
microseconds over a few thousand tokens) and the rejected tokens of each verification pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from local_llm_kit.errors import InvalidRequestError

__all__ = ["DEFAULT_DRAFT_TOKENS", "MAX_DRAFT_TOKENS", "PromptLookup", "SpeculationStats", "draft_tokens"]


DEFAULT_DRAFT_TOKENS = 8
"""Longest draft verified in one pass by default (``prompt_lookup=True``)."""
MAX_DRAFT_TOKENS = 64
NGRAM_SIZES = (3, 2)
"""n-gram lengths matched, longest first. Single tokens match everywhere in free text and their
continuations are mostly wrong, so they are not used."""


@dataclass
class SpeculationStats:
    """Totals over the generations that ran while set as :attr:`PromptLookup.stats` (benchmarks)."""

    drafted: int = 0
    accepted: int = 0
    verifications: int = 0


class PromptLookup:
    """Drafts continuations of one generation's token sequence from that sequence itself.

    The draft length adapts the way transformers' assisted generation does: it grows by two when
    a whole draft was accepted and shrinks by one when part of it was rejected, so free text (few
    matches, short drafts) costs little and copying (long accepted runs) gains the most.
    """

    stats: SpeculationStats | None = None
    """Set (on the class) to a :class:`SpeculationStats` to count drafts of later generations."""

    def __init__(self, prompt: Sequence[int], max_tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
        if max_tokens < 1:
            raise ValueError(f"a draft needs at least one token, not {max_tokens}")
        self.max_tokens = max_tokens
        self._length = min(4, max_tokens)
        self._buffer = np.zeros(max(64, 2 * len(prompt)), dtype=np.int64)
        self._size = 0
        self.drafted = 0
        """Tokens proposed so far (for benchmarks)."""
        self.accepted = 0
        """Drafted tokens the decode loop kept."""
        self.extend(prompt)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens that are now part of the sequence (the prompt, then each step's tokens)."""
        end = self._size + len(tokens)
        if end > self._buffer.size:
            grown = np.zeros(max(end, 2 * self._buffer.size), dtype=np.int64)
            grown[:self._size] = self._buffer[:self._size]
            self._buffer = grown
        self._buffer[self._size:end] = tokens
        self._size = end

    def draft(self, limit: int) -> list[int]:
        """Up to ``min(limit, current length)`` tokens that followed the latest earlier occurrence
        of the sequence's last n-gram; empty when there is none."""
        limit = min(limit, self._length)
        if limit < 1:
            return []
        history = self._buffer[:self._size]
        for n in NGRAM_SIZES:
            if self._size <= n:
                continue
            tail = history[-n:]
            # Candidate starts: where the n-gram's first token occurs, excluding the tail itself.
            starts = np.flatnonzero(history[:-n] == tail[0])
            for offset in range(1, n):
                starts = starts[history[starts + offset] == tail[offset]]
            if starts.size:
                begin = int(starts[-1]) + n  # the latest match: the most relevant context
                return history[begin:begin + limit].tolist()  # type: ignore[no-any-return]
        return []

    def feedback(self, proposed: int, accepted: int) -> None:
        """Record a verified draft of ``proposed`` tokens of which the first ``accepted`` were kept."""
        self.drafted += proposed
        self.accepted += accepted
        if PromptLookup.stats is not None:
            PromptLookup.stats.drafted += proposed
            PromptLookup.stats.accepted += accepted
            PromptLookup.stats.verifications += 1
        if accepted == proposed:
            self._length = min(self.max_tokens, self._length + 2)
        else:
            self._length = max(1, self._length - 1)


def draft_tokens(value: object, *, param: str = "prompt_lookup") -> int:
    """The ``prompt_lookup`` setting as a draft length: ``True`` is :data:`DEFAULT_DRAFT_TOKENS`,
    ``False`` or 0 turns speculation off, an integer caps the draft."""
    if value is True:
        return DEFAULT_DRAFT_TOKENS
    if value is False:
        return 0
    if not isinstance(value, int) or not 0 <= value <= MAX_DRAFT_TOKENS:
        raise InvalidRequestError(f"{param} must be a boolean or an integer from 0 to {MAX_DRAFT_TOKENS} "
                                  f"(the longest draft verified per forward pass), got {value!r}", param=param)
    return value
