"""Short valid completions of a partly generated structure, found with the grammar's own masks.

When a constrained reply is about to run out of ``max_tokens`` (or of context), the decode loop
steers it to a completion the grammar accepts: close the open string, the open containers, and
write the smallest values the schema allows for required fields still missing. The completion is
searched token by token from the matcher's state: forced tokens (and the first token of forced
bytes) are taken as they are; otherwise the allowed token that closes most is preferred (``"``,
``}``, ``]`` and their combinations; a closing quote first inside a string, where ``}`` is only
text, and last outside one, where it would open a string), then the smallest values (``0``,
``""``, ``[]``, ``{}``, ``null``...), then single characters. Every token comes from the
grammar's mask, so the completed reply is always accepted; the search is greedy, so the
completion is short but not necessarily the shortest.

:class:`RepetitionGuard` (opt-in, the ``repetition_guard`` request parameter) spots a reply whose
last tokens repeat one short sequence over and over (``"Lisbon_Lisbon_Lisbon_..."``, the same
array item again and again), so the structure can be closed there instead of at ``max_tokens``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Collection, Sequence

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from local_llm_kit.errors import InvalidRequestError

__all__ = ["DEFAULT_REPEATS", "Closer", "RepetitionGuard", "closer_for", "repetition_guard"]

_CLOSERS = frozenset(b'"}]')
# Values that complete in one token, best first.
_SMALL_VALUES = (b"0", b'""', b"[]", b"{}", b"null", b"false", b"true", b"1", b"[", b"{", b'"')
_LOOP = 4
_MAX_BANNED = 16
MAX_COMPLETION_TOKENS = 4096
"""A search that needs more tokens than this gives up (the reply is then cut as before)."""


class Closer:
    """Finds short completions for one tokenizer (its token ranking is computed once)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer) -> None:
        # Rankings of the few hundred tokens worth preferring, found by tokenizing candidate texts
        # (decoding a whole 262k vocabulary in Python would take seconds). Two of them: inside a
        # string, where ``}`` and ``]`` are only more text so a closing quote comes first, and
        # elsewhere, where a quote would open a string so it comes late.
        inside: dict[int, tuple[int, int]] = {}
        outside: dict[int, tuple[int, int]] = {}

        def rank(text: bytes, key_inside: tuple[int, int], key_outside: tuple[int, int]) -> None:
            tokens = tokenizer.tokenize_bytes(text)
            if len(tokens) == 1:
                token = int(tokens[0])
                inside[token] = min(inside.get(token, key_inside), key_inside)
                outside[token] = min(outside.get(token, key_outside), key_outside)

        closers = [bytes(c) for n in range(1, 5) for c in itertools.product(b'"}]', repeat=n)]
        for lead in (b"", b" "):
            for core in closers:
                if core == b'""':
                    continue
                within = -4 * len(core) + len(lead)  # most closing, then shortest
                quoted = core[0] == ord('"')
                rank(lead + core, (0 if quoted else 1, within), (4 if quoted else 0, within))
            # Outside a string a comma ends the value being written and moves on to the next required
            # key or item. It must come before the small values: after a digit, ``0`` is allowed too and
            # extends the number forever (Gemma's ``,`` has a higher id than ``e``, so ranking it as any
            # other character sent the search into an endless exponent).
            rank(lead + b",", (5, len(lead)), (1, len(lead)))
            for i, core in enumerate(_SMALL_VALUES):
                tier = 3 if core == b'"' else 2
                rank(lead + core, (tier, i * 2 + len(lead)), (4 if tier == 3 else 2, i * 2 + len(lead)))
            for char in range(0x20, 0x7F):  # single characters: short, unlikely to open anything new
                rank(lead + bytes([char]), (5, 2 * char + len(lead)), (5, 2 * char + len(lead)))
        self.tops = tuple([t for t, _ in sorted(table.items(), key=lambda kv: (kv[1], kv[0]))]
                          for table in (inside, outside))
        self.vocab = tokenizer.vocab_size
        self._tokenizer = tokenizer
        # Allowed only inside a JSON string (or free text): they tell which ranking applies. A string
        # with a pattern or a format allows no backslash, but most allow a letter.
        self._markers = [int(t[0]) for t in (tokenizer.tokenize_bytes(b"\\"), tokenizer.tokenize_bytes(b"a"))
                         if len(t) == 1]

    def pick(self, matcher: llguidance.LLMatcher, excluded: Collection[int], limit: int, *,
             inside: bool = False) -> int | None:
        """The best token ``matcher`` allows next, below ``limit``; ``inside``: rank as inside a string
        whatever the grammar suggests.

        Candidates are checked one by one in ranking order (a lexer step each, microseconds); the
        full mask over the vocabulary (up to milliseconds on Gemma's 262k tokens) is computed only
        when none of them is allowed."""
        def allowed(token: int) -> bool:
            return token < limit and token not in excluded and matcher.validate_tokens([token]) == 1

        which = 0 if inside or any(matcher.validate_tokens([t]) == 1 for t in self._markers) else 1
        for token in self.tops[which]:
            if allowed(token):
                return token
        # None of the preferred tokens fits (a pattern, a special marker...): any allowed one.
        bitmask = llg_numpy.allocate_token_bitmask(1, self.vocab)
        llg_numpy.fill_next_token_bitmask(matcher, bitmask)
        bits = np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")[: min(self.vocab, limit)]
        for candidate in np.flatnonzero(bits).tolist():
            if candidate not in excluded:
                return int(candidate)
        return None

    def _forced_bytes_token(self, matcher: llguidance.LLMatcher, excluded: Collection[int],
                            limit: int) -> int | None:
        """The token that starts the bytes the grammar forces, when tokenization left them unforced (``>``
        after ``</tool_call``, where ``><`` would also be allowed)."""
        forced = matcher.compute_ff_bytes()
        if not forced:
            return None
        tokens = self._tokenizer.tokenize_bytes(forced)
        if not tokens:
            return None
        token = int(tokens[0])
        allowed = token < limit and token not in excluded and matcher.validate_tokens([token]) == 1
        return token if allowed else None

    def complete(self, matcher: llguidance.LLMatcher, excluded: Collection[int], limit: int,
                 max_tokens: int = MAX_COMPLETION_TOKENS) -> list[int] | None:
        """Tokens that take ``matcher`` (left unchanged) to an accepting state; None if none found."""
        m = matcher.deep_copy()
        path: list[int] = []
        # A token picked _LOOP times in a row is not taken again until the grammar forces something:
        # inside a string whose pattern or format forbids the closing quote for now, the first
        # ranked token may be allowed forever (``0`` in ``^[0-9]+$``, ``}`` in an email address).
        banned: set[int] = set()
        run = 0
        while not m.is_accepting():
            if len(path) >= max_tokens or m.is_error():
                return None
            forced = []
            for token in m.compute_ff_tokens():
                if token in excluded:
                    break
                forced.append(token)
            if forced:
                if not m.consume_tokens(forced):
                    return None
                path += forced
                banned.clear()
                run = 0
                continue
            picked = self._forced_bytes_token(m, excluded, limit)
            if picked is None and banned:  # a loop: most likely inside a string, where a quote ends it
                picked = self.pick(m, banned.union(excluded), limit, inside=True)
            if picked is None:
                picked = self.pick(m, excluded, limit)
            if picked is None or not m.consume_token(picked):
                return None
            run = run + 1 if path and path[-1] == picked else 1
            if run >= _LOOP:
                banned.add(picked)
                if len(banned) > _MAX_BANNED:
                    return None  # no way out found (a string that must contain given text...): give up early
            path.append(picked)
        return path


_closers: dict[int, tuple[llguidance.LLTokenizer, Closer]] = {}
_closers_lock = threading.Lock()


def closer_for(tokenizer: llguidance.LLTokenizer) -> Closer:
    """The closer of ``tokenizer`` (built once per tokenizer, in a few ms)."""
    key = id(tokenizer)
    with _closers_lock:
        entry = _closers.get(key)
        if entry is None:
            entry = (tokenizer, Closer(tokenizer))  # the tokenizer is kept alive, so its id stays unique
            _closers[key] = entry
    return entry[1]


# -- the repetition guard ------------------------------------------------------------------------
DEFAULT_REPEATS = 4
"""``repetition_guard=True``: a sequence repeated this many times in a row (and over MIN_SPAN tokens)."""
MAX_REPEATS = 1000
MAX_UNIT = 16
"""The longest repeated sequence looked for, in tokens."""
MIN_SPAN = 16
"""The fewest tokens a repetition covers before it counts (``1000000`` is a number, not a loop)."""


def repetition_guard(value: object, *, param: str = "repetition_guard") -> int:
    """The ``repetition_guard`` parameter as a number of repeats: ``True`` is :data:`DEFAULT_REPEATS`,
    ``False``, ``None`` or 0 turn the guard off, an integer from 2 sets the repeats."""
    if value is None or value is False:
        return 0
    if value is True:
        return DEFAULT_REPEATS
    if not isinstance(value, int) or not (value == 0 or 2 <= value <= MAX_REPEATS):
        raise InvalidRequestError(f"{param} must be a boolean, 0 (off) or an integer from 2 to {MAX_REPEATS} (how "
                                  f"many times a token sequence may repeat in a row), got {value!r}", param=param)
    return value


def repeated_unit(tokens: Sequence[int], repeats: int) -> int | None:
    """The length of the sequence (1 to :data:`MAX_UNIT` tokens) that the end of ``tokens`` repeats at
    least ``repeats`` times in a row over at least :data:`MIN_SPAN` tokens; None if there is none."""
    total = len(tokens)
    for unit in range(1, MAX_UNIT + 1):
        span = max(repeats * unit, MIN_SPAN)
        span += -span % unit  # whole repeats
        if span > total:
            continue
        tail = tokens[total - span:]
        if tail[unit:] == tail[:-unit]:  # periodic: the same ``unit`` tokens over the whole span
            return unit
    return None


class RepetitionGuard:
    """Watches one reply's tokens for a degenerate repetition (see :func:`repeated_unit`)."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self._keep = max(repeats * MAX_UNIT, MIN_SPAN) + MAX_UNIT
        self._recent: list[int] = []

    def push(self, tokens: Sequence[int]) -> int | None:
        """Add the reply's next tokens; the repeated sequence's length once a repetition is found."""
        self._recent.extend(tokens)
        if len(self._recent) > 2 * self._keep:
            del self._recent[:-self._keep]
        return repeated_unit(self._recent, self.repeats)
