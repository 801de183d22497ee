"""Short valid completions of a partly generated structure, found with the grammar's own masks.

When a constrained reply is about to run out of ``max_tokens`` (or of context), the decode loop
steers it to a completion the grammar accepts: close the open string, the open containers, and
write the smallest values the schema allows for required fields still missing. The completion is
searched token by token from the matcher's state: forced tokens (and the first token of forced
bytes) are taken as they are; otherwise the allowed token that closes most is preferred (``"``,
``}``, ``]`` and their combinations; a closing quote first inside a string, where ``}`` is only
text, and last outside one, where it would open a string), then the smallest values (``0``,
``""``, ``[]``, ``{}``, ``null``...), then single characters. A string whose ``pattern`` or
``format`` does not allow the closing quote yet is ended with the ending of a sample text that
matches it (:mod:`local_llm_kit.witnesses`: ``@a.aa`` after ``john``), which the masks alone
cannot point to. Every token comes from the grammar's mask, so the completed reply is always
accepted. This search is greedy, so its completion is short but not necessarily the shortest;
the shortest whole reply (the ``max_tokens`` minimum, searched once per grammar) comes from
:meth:`Closer.shortest`, which tries the alternatives where the greedy search picks text (which
key, which enum value) and writes the result with the tokenizer's longest tokens.

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
_WIDTH = 16
_SLACK = 8
_LONGEST = 32
_CACHED = 1 << 16  # bytes: the longest token compact() looks for
_TRIES = 96
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
        # Plain characters: where one ranks first, the search is choosing text (which key, which enum
        # value, what goes in a patterned string), and the first by code point is as good as any guess.
        # Tokens that end a string (``"``, ``"}``, `` "``...): while one is allowed, no tail is needed.
        self._enders = [t for t in self.tops[0] if inside[t][0] == 0]
        self._plain = tuple(frozenset(t for t, key in table.items() if key[0] == 5) for table in (inside, outside))
        self.vocab = tokenizer.vocab_size
        self._tokenizer = tokenizer
        # Allowed only inside a JSON string (or free text): they tell which ranking applies. A string
        # with a pattern or a format allows no backslash, but most allow a letter.
        self._markers = [int(t[0]) for t in (tokenizer.tokenize_bytes(b"\\"), tokenizer.tokenize_bytes(b"a"))
                         if len(t) == 1]
        self._first: dict[bytes, int | None] = {}
        """The tokenizer's first token for texts compact() spelled (a cache, cleared when full)."""
        quote = tokenizer.tokenize_bytes(b'"')
        self._quote = int(quote[0]) if len(quote) == 1 else None

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

    def _choices(self, matcher: llguidance.LLMatcher, excluded: Collection[int], limit: int, count: int) -> list[int]:
        """Up to ``count`` plain characters allowed next, when the best ranked allowed token is one."""
        which = 0 if any(matcher.validate_tokens([t]) == 1 for t in self._markers) else 1
        found: list[int] = []
        for token in self.tops[which]:
            if token < limit and token not in excluded and matcher.validate_tokens([token]) == 1:
                if token not in self._plain[which]:
                    if not found:
                        return []  # a closer or a small value comes first: the greedy choice stands
                    continue
                found.append(token)
                if len(found) == count:
                    break
        return found

    def shortest(self, matcher: llguidance.LLMatcher, excluded: Collection[int], limit: int,
                 tails: Sequence[Sequence[int]] = (), max_tokens: int = MAX_COMPLETION_TOKENS, *,
                 width: int = _WIDTH, tries: int = _TRIES) -> list[int] | None:
        """A completion at most as long as :meth:`complete`'s, most often far shorter; used for the
        shortest whole reply (searched once per grammar).

        Where the greedy search chooses text (which key, which enum value...), up to ``width`` allowed
        characters are each followed by a greedy completion, and the continuation that takes fewest
        tokens once written with the tokenizer's longest tokens (:meth:`compact`) is kept: a pilot
        search, ``tries`` completions at most. The greedy search alone takes the first key by code
        point: an optional ``"scm_url_base"`` (a URI) came before the required ``"tests"``, and a reply
        of 10 tokens was estimated at 89."""
        greedy = self.complete(matcher, excluded, limit, max_tokens, tails)
        if greedy is None:
            return None
        best = greedy
        m = matcher.deep_copy()
        done = 0
        while done < len(best):
            choices = [] if tries <= 0 or m.compute_ff_tokens() else [
                t for t in self._choices(m, excluded, limit, width) if t != best[done]]
            current: int | None = None  # the current continuation's cost, computed when first needed
            for token in choices[:tries]:
                tries -= 1
                if not m.consume_token(token):
                    return self.compact(matcher, best, excluded, limit)  # not expected: every choice was validated
                steps = 1
                forced = list(itertools.takewhile(lambda t: t not in excluded, m.compute_ff_tokens()))
                if forced and m.consume_tokens(forced):
                    steps += len(forced)
                else:
                    forced = []
                # A continuation a few tokens longer as searched may be shorter once written compactly.
                room = len(best) - done - steps + _SLACK
                rest = self.complete(m, excluded, limit, room, tails) if room >= 0 else None
                m.rollback(steps)
                if rest is not None:
                    if current is None:
                        current = self._cost(m, best[done:], excluded, limit)
                    cost = self._cost(m, [token, *forced, *rest], excluded, limit)
                    if cost < current:
                        best, current = [*best[:done], token, *forced, *rest], cost
            if not m.consume_token(best[done]):
                break  # not expected: the path was found with this grammar's own masks
            done += 1
        return min(self.compact(matcher, best, excluded, limit), self.compact(matcher, greedy, excluded, limit),
                   key=len)

    def _cost(self, matcher: llguidance.LLMatcher, path: Sequence[int], excluded: Collection[int],
              limit: int) -> int:
        return len(self.compact(matcher, path, excluded, limit))

    def _spelling(self, matcher: llguidance.LLMatcher, target: bytes, pos: int, excluded: Collection[int],
                  limit: int) -> int | None:
        """An allowed token that spells ``target`` from ``pos``: the tokenizer's own first token for the
        rest when the grammar allows it, else the longest one allowed."""
        def fits(token: int, end: int) -> bool:
            return (token < limit and token not in excluded and self._tokenizer.decode_bytes([token]) == target[pos:end]
                    and matcher.validate_tokens([token]) == 1)

        text = target[pos:pos + _LONGEST]
        token = self._first.get(text, -1)
        if token == -1:  # tokenizing takes ~70 µs through llama.cpp: the same texts come back often
            first = self._tokenizer.tokenize_bytes(text)
            token = int(first[0]) if first else None
            if len(self._first) >= _CACHED:
                self._first.clear()
            self._first[text] = token
        if token is not None:
            end = pos + len(self._tokenizer.decode_bytes([token]))
            if end > pos and fits(token, end):
                return token
        for end in range(min(len(target), pos + _LONGEST), pos, -1):
            tokens = self._tokenizer.tokenize_bytes(target[pos:end])
            if len(tokens) == 1 and fits(int(tokens[0]), end):
                return int(tokens[0])
        return None

    def compact(self, matcher: llguidance.LLMatcher, path: Sequence[int], excluded: Collection[int],
                limit: int) -> list[int]:
        """``path``'s text in fewer tokens where the grammar allows it: the search writes text a character
        at a time (``t``, ``e``, ``s``... until the grammar forces the rest of a key), where the
        tokenizer has ``tests`` and `` {},``. At each free step the longest token that spells the text
        next is taken; forced tokens are taken as the decode loop takes them (so the decode loop can
        follow the result token by token). ``path`` itself if that is not shorter."""
        target = self._tokenizer.decode_bytes(list(path))
        m = matcher.deep_copy()
        out: list[int] = []
        pos = 0
        while pos < len(target) or not m.is_accepting():
            if len(out) >= len(path) or m.is_error():
                return list(path)
            forced = list(itertools.takewhile(lambda t: t not in excluded, m.compute_ff_tokens()))
            if forced:
                spelled = self._tokenizer.decode_bytes(forced)
                if not target.startswith(spelled, pos) or not m.consume_tokens(forced):
                    return list(path)
                out += forced
                pos += len(spelled)
                continue
            token = self._spelling(m, target, pos, excluded, limit)
            if token is None:
                return list(path)
            m.consume_token(token)
            out.append(token)
            pos += len(self._tokenizer.decode_bytes([token]))
        return out if len(out) < len(path) else list(path)

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

    def tails(self, texts: Sequence[bytes]) -> tuple[tuple[int, ...], ...]:
        """Every ending of ``texts`` (see :func:`local_llm_kit.witnesses.witnesses`) as tokens, fewest first."""
        found = {tuple(int(t) for t in self._tokenizer.tokenize_bytes(text[i:]))
                 for text in texts for i in range(len(text))}
        return tuple(sorted((t for t in found if t), key=lambda t: (len(t), t)))

    def _tail(self, matcher: llguidance.LLMatcher, tails: Sequence[Sequence[int]], excluded: Collection[int],
              limit: int) -> Sequence[int] | None:
        """The first of ``tails`` after which a string's closing quote is allowed, when no token that ends
        the string is allowed now."""
        quote = self._quote
        if quote is None or any(matcher.validate_tokens([t]) == 1 for t in self._enders):
            return None
        for tail in tails:
            if all(t < limit and t not in excluded for t in tail) and (
                    matcher.validate_tokens([*tail, quote]) == len(tail) + 1):
                return tail
        return None

    def complete(self, matcher: llguidance.LLMatcher, excluded: Collection[int], limit: int,
                 max_tokens: int = MAX_COMPLETION_TOKENS, tails: Sequence[Sequence[int]] = ()) -> list[int] | None:
        """Tokens that take ``matcher`` (left unchanged) to an accepting state; None if none found.

        ``tails`` (from :meth:`tails`) end strings whose pattern or format does not allow the closing
        quote yet: where the quote is not allowed, the first tail after which it is gets written."""
        m = matcher.deep_copy()
        path: list[int] = []
        # A token picked _LOOP times in a row is not taken again until the grammar forces something:
        # inside a string whose pattern or format forbids the closing quote for now, the first
        # ranked token may be allowed forever (``0`` in ``^[0-9]+$``, ``}`` in an email address).
        banned: set[int] = set()
        run = 0
        after_tail = False  # a tail was just written: the string it ends is still open (its quote comes next)
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
                run, after_tail = 0, False
                continue
            tail = self._tail(m, tails, excluded, limit) if tails else None
            if tail is not None:
                if len(path) + len(tail) > max_tokens or not m.consume_tokens(list(tail)):
                    return None
                path += tail
                banned.clear()
                run, after_tail = 0, True
                continue
            picked = self._forced_bytes_token(m, excluded, limit)
            if picked is None and banned:  # a loop: most likely inside a string, where a quote ends it
                picked = self.pick(m, banned.union(excluded), limit, inside=True)
            if picked is None:
                picked = self.pick(m, excluded, limit, inside=after_tail)
            after_tail = False
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
