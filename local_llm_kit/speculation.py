"""Prompt-lookup drafting: guess the next tokens by finding the end of the text earlier in it.

Agent and RAG replies often copy spans of their input: tool arguments built from the question,
quoted passages, JSON filled from a document. When the last few tokens of the sequence (prompt
and reply so far) occurred earlier, the tokens that followed them then are a cheap guess of what
follows now. The decode loop evaluates the guess in the same forward pass as the token it has
just chosen and keeps the longest prefix the sampler would have produced anyway, so the output is
exactly the one decoding without drafts gives (see :func:`local_llm_kit.decoding.generate`); only
the number of forward passes changes.

No draft model, no training: the cost is a vectorized match search per step (tens of
microseconds over a few thousand tokens) and the rejected tokens of each verification pass, which
are only verified where the engine's measured pass costs say they pay (:class:`PassCosts`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from local_llm_kit.errors import InvalidRequestError

__all__ = [
    "DEFAULT_DRAFT_TOKENS", "MAX_DRAFT_TOKENS", "PassCosts", "PassPrices", "PromptLookup", "SpeculationStats",
    "draft_tokens",
]


DEFAULT_DRAFT_TOKENS = 8
"""Longest draft verified in one pass by default (``prompt_lookup=True``)."""
MAX_DRAFT_TOKENS = 64
MIN_MATCH = 2
"""Fewest tokens a match must have. Single tokens match everywhere in free text and their
continuations are mostly wrong, so they are not used."""
MAX_MATCH = 16
"""Longest match sought: past it, the latest occurrence is taken."""
MATCH_CLASSES = (MIN_MATCH, 4, 8)
"""Lower bounds of the match lengths whose acceptance is learned apart: 2 to 3, 4 to 7, 8 and more."""


@dataclass
class SpeculationStats:
    """Totals over the generations that ran while set as :attr:`PromptLookup.stats` (benchmarks)."""

    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    declined: int = 0
    """Steps where a continuation was found but not worth verifying (see :meth:`PromptLookup.draft`)."""


class PassCosts:
    """What a decode-loop forward pass costs on one loaded model, as a function of the positions
    it evaluates and of the rows of logits it returns: seconds per pass for each size timed so
    far (moving averages), read as a multiple of a one-position decode step.

    Engines differ by an order of magnitude here, and not only in level but in shape. On a GPU a
    pass of nine positions costs little more than one, so long drafts pay even when most of
    their tokens are rejected. llama.cpp on a small CPU has a concave curve: on a 2-core AMD
    EPYC with SmolLM2 and 2 threads, passes of 2, 4 and 9 positions cost 1.9, 2.5 and 4.1 decode
    steps, so a second position is dear and each one after it cheap, and only long drafts that
    are mostly right pay. A straight line through one measured size misjudges every other size,
    which is why each size is timed on its own (:meth:`shares`). A size not timed yet is
    interpolated between its timed neighbours. Past the largest timed size each position is
    assumed to cost what one did between the two largest timed sizes, or :attr:`PRIOR_EXTRA` if
    that is less: an optimistic guess, so that a longer draft gets tried once, and so timed.

    Rows of logits cost apart from positions where the output layer is large: Gemma 3's has 262k
    entries, and on that CPU a pass of 4 positions took 16 ms returning one row and 27 returning
    two, against 11 for a decode step. Passes that return one row (a run of tokens a grammar
    forces) are timed as a second curve, and passes returning some of their rows teach the cost
    of a row beyond the first (:meth:`cost`).
    """

    PRIOR_EXTRA = 0.25
    """Cost of a position in a pass larger than any timed so far, as a share of a one-position
    pass, at most (less where the timed curve rises more slowly)."""
    WEIGHT = 0.1

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}  # passes returning every position's row (1: a step)
        self._one_row: dict[int, float] = {}  # passes of 2 or more positions returning the last row
        self._row_share: float | None = None  # a row beyond the first, as a share of a step

    def record(self, positions: int, seconds: float, rows: int | None = None) -> None:
        """Time a decode-loop pass of ``positions`` positions that returned ``rows`` rows of logits
        (None: every position's)."""
        rows = positions if rows is None else rows
        if not 1 <= rows <= positions:
            raise ValueError(f"a pass of {positions} positions returns 1 to {positions} rows, not {rows}")
        if rows == positions:
            self._seconds[positions] = _average(self._seconds.get(positions), seconds, self.WEIGHT)
        elif rows == 1:
            self._one_row[positions] = _average(self._one_row.get(positions), seconds, self.WEIGHT)
        single = self._seconds.get(1)
        if rows > 1 and single and self._one_row:
            one_row = self._one_row_shares(positions)[-1]
            observed = max(0.0, (seconds / single - one_row) / (rows - 1))
            self._row_share = _average(self._row_share, observed, self.WEIGHT)

    def shares(self, positions: int) -> list[float]:
        """Cost of a pass of 1, 2, ... ``positions`` positions returning every row, each as a
        multiple of a one-position pass. A timed size is taken as timed, even where it costs less
        than a smaller one (kernels that work in tiles of several positions make that common)."""
        single = self._seconds.get(1)
        if not single:
            return [1.0 + self.PRIOR_EXTRA * n for n in range(positions)]
        return _curve(self._seconds, single, positions, self.PRIOR_EXTRA)

    def cost(self, positions: int, rows: int) -> float:
        """Cost of a pass of ``positions`` positions returning ``rows`` rows, as a multiple of a
        one-position pass (see :meth:`prices`)."""
        return self.prices(positions).cost(positions, rows)

    def prices(self, positions: int) -> PassPrices:
        """The costs of passes of up to ``positions`` positions, worked out once for one decision.

        Until a pass returning fewer rows than positions has been timed, rows are taken to cost
        nothing apart (the every-row curve of :meth:`shares`); a pass returning one row costs what
        its own curve says; between, the first row's cost plus a learned cost per further row (at
        most a timed pass of every row), or, before that is learned, a share of the every-row pass
        in proportion to the rows."""
        single = self._seconds.get(1)
        one_row = self._one_row_shares(positions) if single and self._one_row else None
        return PassPrices(self.shares(positions), one_row, self._row_share, frozenset(self._seconds))

    def _one_row_shares(self, positions: int) -> list[float]:
        single = self._seconds[1]
        return _curve({1: single, **self._one_row}, single, positions, self.PRIOR_EXTRA)

    @property
    def extra_share(self) -> float:
        """A summary for reports: the mean cost of each drafted position in a pass verifying a
        default-length draft, as a share of a one-position pass."""
        return (self.shares(DEFAULT_DRAFT_TOKENS + 1)[-1] - 1.0) / DEFAULT_DRAFT_TOKENS


def _curve(seconds: dict[int, float], single: float, positions: int, prior_extra: float) -> list[float]:
    """The costs of passes of 1..``positions`` positions from timed ones (``seconds`` by size),
    as multiples of ``single``: see :class:`PassCosts`."""
    timed = sorted(p for p in seconds if p > 1)
    anchor, anchor_share = 1, 1.0
    slope = prior_extra  # per position, past the largest timed size
    out = [1.0]
    following = 0  # index in ``timed`` of the first timed size above the anchor
    for size in range(2, positions + 1):
        while following < len(timed) and timed[following] < size:
            following += 1
        if following < len(timed) and timed[following] == size:
            # Believed as timed, even below a smaller size: llama.cpp's kernels work in tiles, and on
            # the EPYC a pass of Gemma's 8 positions (every row) took 34 ms where 7 took 48.
            share = seconds[size] / single
            slope = min(prior_extra, max(0.0, (share - anchor_share) / (size - anchor)))
            anchor, anchor_share = size, share
            out.append(anchor_share)
            continue
        if following < len(timed):
            above = timed[following]
            above_share = seconds[above] / single
            out.append(anchor_share + (above_share - anchor_share) * (size - anchor) / (above - anchor))
        else:
            out.append(anchor_share + slope * (size - anchor))
    return out


@dataclass(frozen=True)
class PassPrices:
    """Pass costs for one draft decision, as multiples of a one-position pass (:meth:`PassCosts.prices`)."""

    every_row: list[float]
    """Index ``n - 1``: a pass of ``n`` positions returning every row."""
    one_row: list[float] | None
    """Index ``n - 1``: a pass of ``n`` positions returning the last row; None: none timed yet."""
    row_share: float | None
    """A row beyond the first; None: not learned yet."""
    timed: frozenset[int]
    """Sizes whose every-row pass was timed, which bound the learned row cost."""

    def cost(self, positions: int, rows: int) -> float:
        every_row = self.every_row[positions - 1]
        if rows >= positions or self.one_row is None:
            return every_row
        one_row = self.one_row[positions - 1]
        if rows == 1:
            return one_row
        if self.row_share is None:
            return one_row + max(0.0, every_row - one_row) * (rows - 1) / (positions - 1)
        estimate = one_row + self.row_share * (rows - 1)
        if positions in self.timed:  # a timed pass of every row bounds it (an extrapolated one does not)
            estimate = min(estimate, every_row)
        return max(one_row, estimate)


class PromptLookup:
    """Drafts continuations of one generation's token sequence from that sequence itself.

    The draft is what followed the earlier occurrence that matches the sequence's end the
    longest (:meth:`continuation`). How long that match is says a lot about the draft: when the
    reply is copying a span, the last dozen tokens occur earlier and what followed them is
    nearly always right; a match of two or three tokens is a common phrase, and its continuation
    mostly wrong. (SmolLM2 on the project's copying tasks: drafts after a match of 7 or more
    tokens were kept at 88 to 100%, after 2 or 3 tokens at 12 to 34%.) So acceptance is learned per class
    of match length (:data:`MATCH_CLASSES`), from this generation's own drafts.

    How much of a continuation to verify is a cost decision (:meth:`plan`): what the passes plain
    decoding would make for the draft's expected accepted prefix cost, against what one pass of
    the draft's positions and rows costs on this engine (:class:`PassCosts`). Tokens a grammar
    forces are no gain there: plain decoding evaluates a forced run in one pass as well. A draft
    no length of which beats plain decoding is
    not verified; its first token is still compared with the token the step then chooses, so
    acceptance keeps being learned for free and drafting resumes when the reply starts copying.
    """

    stats: SpeculationStats | None = None
    """Set (on the class) to a :class:`SpeculationStats` to count drafts of later generations."""

    DECAY = 0.9
    """Weight left to earlier acceptance observations at each new one: about the last ten count."""
    MIN_GAIN = 1.05
    """How many times cheaper than plain decoding's passes a draft's pass must be expected to be."""
    PRIORS = ((1.0, 1.0), (1.0, 1.0), (3.0, 1.0))
    """(kept, rejected) pseudo-counts each match class starts from: one half for short matches,
    three quarters for long ones, until this generation's drafts say otherwise."""

    def __init__(self, prompt: Sequence[int], max_tokens: int = DEFAULT_DRAFT_TOKENS,
                 costs: PassCosts | None = None) -> None:
        if max_tokens < 1:
            raise ValueError(f"a draft needs at least one token, not {max_tokens}")
        self.max_tokens = max_tokens
        self.costs = costs if costs is not None else PassCosts()
        self._hits = [hits for hits, _ in self.PRIORS]
        self._misses = [misses for _, misses in self.PRIORS]
        self._class = 0  # the match class of the latest draft
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
        """The estimated chance that a drafted token is the one chosen, for the latest draft's
        class of match length."""
        return self._hits[self._class] / (self._hits[self._class] + self._misses[self._class])

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
        """The tokens worth verifying next, at most ``limit``, with no grammar and nothing else
        pending: see :meth:`plan`."""
        return self.plan(limit)[0]

    def plan(self, limit: int, *, pending: int = 1,
             outputs_of: Callable[[Sequence[int]], list[bool]] | None = None) -> tuple[list[int], list[bool]]:
        """The draft worth verifying next, at most ``limit`` tokens, and which rows of logits its
        verification needs: a prefix of :meth:`continuation` (empty when there is none or no
        draft is expected to beat plain decoding), and one flag per position from the last
        pending token on, True where the next token is sampled rather than forced.

        ``pending`` is how many tokens the pass evaluates anyway (the token just chosen and any a
        grammar forced after it). ``outputs_of`` judges a candidate against the grammar, as
        ``Constraint.draft_outputs`` does: the draft ends where the grammar forbids a token, and a
        forced token is no gain over plain decoding, which evaluates forced runs in one pass too.
        """
        continuation, matched = self._lookup(min(limit, self.max_tokens))
        if not continuation:
            return [], [True]
        self._class = _match_class(matched)
        outputs = [True] * (len(continuation) + 1) if outputs_of is None else outputs_of(continuation)
        length = self._worth(outputs, pending)
        if length == 0:
            self._guess = continuation[0]
            if PromptLookup.stats is not None:
                PromptLookup.stats.declined += 1
        return continuation[:length], outputs[:length + 1]

    def continuation(self, limit: int) -> list[int]:
        """``limit`` tokens that followed the earlier occurrence of the longest suffix of the
        sequence (at least :data:`MIN_MATCH` tokens) that occurs earlier; the latest such one.
        Where those run into the sequence's end, the copy goes on with the tokens it has just
        guessed, as a text repeating itself does (none: no suffix occurs earlier)."""
        return self._lookup(limit)[0]

    def _lookup(self, limit: int) -> tuple[list[int], int]:
        """The continuation, and how many tokens its match is long (0: none)."""
        if limit < 1 or self._size <= MIN_MATCH:
            return [], 0
        history = self._buffer[:self._size]
        # ``ends``: where an earlier occurrence of the sequence's last ``length`` tokens ends
        # (exclusive), so that what followed it starts there; grown a token at a time.
        ends = np.flatnonzero(history[:-1] == history[-1]) + 1
        length = 1
        while length < MAX_MATCH:
            longer = ends[ends > length]
            longer = longer[history[longer - length - 1] == history[-length - 1]]
            if not longer.size:
                break
            ends, length = longer, length + 1
        if length < MIN_MATCH:
            return [], 0
        begin = int(ends[-1])  # the latest of the longest matches: the most relevant context
        continuation = history[begin:begin + limit].tolist()
        # Where the earlier occurrence runs into the present (a list, a refrain, a loop), the copy
        # goes on copying what it has just guessed: the text repeats with period ``size - begin``.
        period = self._size - begin
        while len(continuation) < limit:
            continuation += continuation[-period:][:limit - len(continuation)]
        return continuation, length

    def _worth(self, outputs: Sequence[bool], pending: int) -> int:
        """The draft length whose pass saves the most time against plain decoding; 0 if none saves
        :attr:`MIN_GAIN`. ``outputs``: as :meth:`plan` returns them, for the whole candidate.

        Plain decoding pays a pass for the pending tokens, then a pass for each sampled token
        with the forced run after it; the draft pays one pass for everything, and saves those
        later passes for as long as its sampled tokens are kept. A draft ends only before a
        sampled token, so that a forced run is not split between two passes."""
        p = self.acceptance
        costs = self.costs.prices(pending + len(outputs) - 1)
        plain = costs.cost(pending, 1)
        best_length, best_gain = 0, self.MIN_GAIN
        kept = 1.0  # the chance that every sampled token of the draft so far is kept
        run = 0  # positions in the current sampled token's pass under plain decoding
        rows = 1
        for length in range(1, len(outputs)):
            if outputs[length - 1]:  # drafted token ``length`` is sampled; a forced one joins its run
                kept *= p
                run = 0
            run += 1
            if not outputs[length]:
                continue
            rows += 1
            plain += kept * costs.cost(run, 1)
            gain = plain / costs.cost(pending + length, rows)
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
        c = self._class
        decay = self.DECAY ** count
        self._hits[c] *= decay
        self._misses[c] *= decay
        if hit:
            self._hits[c] += (1.0 - decay) / (1.0 - self.DECAY)  # ``count`` hits, each decayed in turn
        else:
            self._misses[c] += 1.0


def _match_class(length: int) -> int:
    """The index in :data:`MATCH_CLASSES` of the class a match of ``length`` tokens falls in."""
    return sum(length >= bound for bound in MATCH_CLASSES) - 1


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
