"""Short valid completions of a partly generated structure, found with the grammar's own masks.

When a constrained reply is about to run out of ``max_tokens`` (or of context), the decode loop
steers it to a completion the grammar accepts: close the open string, the open containers, and
write the smallest values the schema allows for required fields still missing. The completion is
searched token by token from the matcher's state: forced tokens are taken as they are; otherwise
the allowed token that closes most is preferred (``"``, ``}``, ``]`` and their combinations),
then the smallest values (``0``, ``""``, ``[]``, ``{}``, ``null``...), then the longest allowed
token. Every token comes from the grammar's mask, so the completed reply is always accepted; the
search is greedy, so the completion is short but not necessarily the shortest.
"""

from __future__ import annotations

import threading
from collections.abc import Collection

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

__all__ = ["Closer", "closer_for"]

_CLOSERS = frozenset(b'"}]')
# Values that complete in one token, best first.
_SMALL_VALUES = (b"0", b'""', b"[]", b"{}", b"null", b"false", b"true", b"1", b"[", b"{", b'"')
_TOP = 256
"""Candidates checked one by one before a vectorised scan of the whole vocabulary."""
MAX_COMPLETION_TOKENS = 4096
"""A search that needs more tokens than this gives up (the reply is then cut as before)."""


class Closer:
    """Finds short completions for one tokenizer (its token ranking is computed once)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer) -> None:
        vocab = tokenizer.vocab_size
        tiers = np.full(vocab, 4, dtype=np.int64)
        within = np.zeros(vocab, dtype=np.int64)
        small = {value: i for i, value in enumerate(_SMALL_VALUES)}
        for token in range(vocab):
            data = tokenizer.decode_bytes([token])
            if not data:
                continue  # special tokens: last resort only
            if all(b in _CLOSERS for b in data) and data != b'""':
                # A quote first: inside a string, ``}`` and ``]`` are only more text.
                tiers[token], within[token] = (0 if data[0] == ord('"') else 1), -len(data)
            elif data in small:
                tiers[token], within[token] = 2, small[data]
            else:
                tiers[token], within[token] = 3, -len(data)
        self.order = np.lexsort((np.arange(vocab), within, tiers))
        self.top = [int(t) for t in self.order[:_TOP]]
        self.vocab = vocab

    def pick(self, words: np.ndarray, excluded: Collection[int], limit: int) -> int | None:
        """The best allowed token in the bitmask ``words`` (int32 words), below ``limit``."""
        for token in self.top:
            if token < limit and token not in excluded and (int(words[token >> 5]) >> (token & 31)) & 1:
                return token
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab]
        allowed = bits[self.order].astype(bool)
        for index in np.flatnonzero(allowed):
            token = int(self.order[index])
            if token < limit and token not in excluded:
                return token
        return None

    def complete(self, matcher: llguidance.LLMatcher, excluded: Collection[int], limit: int,
                 max_tokens: int = MAX_COMPLETION_TOKENS) -> list[int] | None:
        """Tokens that take ``matcher`` (left unchanged) to an accepting state; None if none found."""
        m = matcher.deep_copy()
        bitmask = llg_numpy.allocate_token_bitmask(1, self.vocab)
        path: list[int] = []
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
                continue
            llg_numpy.fill_next_token_bitmask(m, bitmask)
            picked = self.pick(bitmask[0], excluded, limit)
            if picked is None or not m.consume_token(picked):
                return None
            path.append(picked)
        return path


_closers: dict[int, tuple[llguidance.LLTokenizer, Closer]] = {}
_closers_lock = threading.Lock()


def closer_for(tokenizer: llguidance.LLTokenizer) -> Closer:
    """The closer of ``tokenizer`` (built once per tokenizer; ~1 s for a 262k vocabulary)."""
    key = id(tokenizer)
    with _closers_lock:
        entry = _closers.get(key)
        if entry is None:
            entry = (tokenizer, Closer(tokenizer))  # the tokenizer is kept alive, so its id stays unique
            _closers[key] = entry
    return entry[1]
