"""Prompt-lookup drafting: guess the next tokens by finding the latest n-gram again in the text.

Agent and RAG replies often copy spans of their input: tool arguments built from the question,
quoted passages, JSON filled from a document. When the last few tokens of the sequence (prompt
and reply so far) occurred earlier, the tokens that followed them then are a cheap guess of what
follows now. The decode loop evaluates the guess in the same forward pass as the token it has
just chosen and keeps the longest prefix the sampler would have produced anyway, so the output is
exactly the one decoding without drafts gives (see :func:`local_llm_kit.decoding.generate`); only
the number of forward passes changes.

No draft model, no training: the cost is a vectorized n-gram search per step (tens of
microseconds over a few thousand tokens) and the rejected tokens of each verification pass, which
are only verified where the engine's measured pass costs say they pay (:class:`PassCosts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from local_llm_kit.errors import InvalidRequestError

__all__ = ["DEFAULT_DRAFT_TOKENS", "MAX_DRAFT_TOKENS", "PassCosts", "PromptLookup", "SpeculationStats", "draft_tokens"]


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
    declined: int = 0
    """Steps where a continuation was found but not worth verifying (see :meth:`PromptLookup.draft`)."""


class PassCosts:
    """What a decode-loop forward pass costs on one loaded model: seconds for one position, and
    seconds for each extra position, learned from the passes timed so far (moving averages).

    Engines differ by an order of magnitude here. On a GPU, or a CPU with wide vector units and
    spare cores, a pass of nine positions costs little more than one, so long drafts pay even
    when most of their tokens are rejected. On a small CPU (llama.cpp on two cores, measured
    for this project) each extra position costs about 0.45 of a whole pass, so a draft pays only
    where most of it is accepted: free text then decodes as fast as without speculation.
    """

    PRIOR_EXTRA = 0.25
    """Extra-position cost (a share of one pass) assumed until a verification pass was timed:
    low enough that drafts are tried, so that their cost gets measured."""
    WEIGHT = 0.1

    def __init__(self) -> None:
        self.single: float | None = None
        self.extra: float | None = None

    def record(self, positions: int, seconds: float) -> None:
        if positions <= 1:
            self.single = _average(self.single, seconds, self.WEIGHT)
        elif self.single is not None:
            per_position = max(0.0, seconds - self.single) / (positions - 1)
            self.extra = _average(self.extra, per_position, self.WEIGHT)

    @property
    def extra_share(self) -> float:
        """The cost of one more position in a pass, as a share of a one-position pass."""
        if not self.single or self.extra is None:
            return self.PRIOR_EXTRA
        return self.extra / self.single


class PromptLookup:
    """Drafts continuations of one generation's token sequence from that sequence itself.

    How much of a continuation to verify is a cost decision (:meth:`draft`): the expected tokens a
    pass yields (one, plus the draft's expected accepted prefix, from the acceptance rate seen so
    far in this generation) against what the pass costs on this engine (:class:`PassCosts`). A
    draft no length of which beats plain decoding is not verified; its first token is still
    compared with the token the step then chooses, so the acceptance rate keeps being learned for
    free and drafting resumes when the reply starts copying.
    """

    stats: SpeculationStats | None = None
    """Set (on the class) to a :class:`SpeculationStats` to count drafts of later generations."""

    DECAY = 0.9
    """Weight left to earlier acceptance observations at each new one: about the last ten count."""
    MIN_GAIN = 1.05
    """Expected tokens per unit of pass cost a draft must reach (plain decoding: 1)."""

    def __init__(self, prompt: Sequence[int], max_tokens: int = DEFAULT_DRAFT_TOKENS,
                 costs: PassCosts | None = None) -> None:
        if max_tokens < 1:
            raise ValueError(f"a draft needs at least one token, not {max_tokens}")
        self.max_tokens = max_tokens
        self.costs = costs if costs is not None else PassCosts()
        self._hits, self._misses = 1.0, 1.0  # an acceptance rate of one half until observed
        self._guess: int | None = None
        self._buffer = np.zeros(max(64, 2 * len(prompt)), dtype=np.int64)
        self._size = 0
        self.drafted = 0
        """Tokens proposed so far (for benchmarks)."""
        self.accepted = 0
        """Drafted tokens the decode loop kept."""
        self.extend(prompt)

    @property
    def acceptance(self) -> float:
        """The estimated chance that the next drafted token is the one chosen."""
        return self._hits / (self._hits + self._misses)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens that are now part of the sequence (the prompt, then each step's tokens)."""
        if self._guess is not None and len(tokens):
            self._observe(int(tokens[0]) == self._guess, 1)
            self._guess = None
        end = self._size + len(tokens)
        if end > self._buffer.size:
            grown = np.zeros(max(end, 2 * self._buffer.size), dtype=np.int64)
            grown[:self._size] = self._buffer[:self._size]
            self._buffer = grown
        self._buffer[self._size:end] = tokens
        self._size = end

    def draft(self, limit: int) -> list[int]:
        """The tokens worth verifying next: a prefix of what followed the latest earlier occurrence
        of the sequence's last n-gram, at most ``limit``; empty when there is no such occurrence or
        no draft is expected to beat decoding one token per pass."""
        continuation = self.continuation(min(limit, self.max_tokens))
        if not continuation:
            return []
        length = self._worth(len(continuation))
        if length == 0:
            self._guess = continuation[0]
            if PromptLookup.stats is not None:
                PromptLookup.stats.declined += 1
        return continuation[:length]

    def continuation(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the last n-gram."""
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

    def _worth(self, available: int) -> int:
        """The draft length with the most expected tokens per unit of pass cost; 0 if none pays."""
        p, extra = self.acceptance, self.costs.extra_share
        best_length, best_gain = 0, self.MIN_GAIN
        expected, run = 0.0, 1.0
        for length in range(1, available + 1):
            run *= p  # the chance that the first ``length`` drafted tokens are all kept
            expected += run
            gain = (1.0 + expected) / (1.0 + extra * length)
            if gain > best_gain:
                best_length, best_gain = length, gain
        return best_length

    def feedback(self, proposed: int, accepted: int) -> None:
        """Record a verified draft of ``proposed`` tokens of which the first ``accepted`` were kept."""
        self.drafted += proposed
        self.accepted += accepted
        if PromptLookup.stats is not None:
            PromptLookup.stats.drafted += proposed
            PromptLookup.stats.accepted += accepted
            PromptLookup.stats.verifications += 1
        if accepted:
            self._observe(True, accepted)
        if accepted < proposed:
            self._observe(False, 1)  # the tokens after the first rejected one tell nothing

    def _observe(self, hit: bool, count: int) -> None:
        decay = self.DECAY ** count
        self._hits *= decay
        self._misses *= decay
        if hit:
            self._hits += (1.0 - decay) / (1.0 - self.DECAY)  # ``count`` hits, each decayed in turn
        else:
            self._misses += 1.0


def _average(current: float | None, value: float, weight: float) -> float:
    return value if current is None else current + weight * (value - current)


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
