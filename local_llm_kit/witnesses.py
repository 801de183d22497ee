"""Sample texts for the strings of a grammar that only some texts can end (a ``pattern``, a ``format``).

The closing search (:mod:`local_llm_kit.closing`) ends an open string with its closing quote. A
string with a ``pattern`` or a ``format`` may not allow that quote yet, and the grammar's masks
say nothing of which characters lead to it: after ``"created": "x``, every character is allowed
by the unanchored pattern ``\\d{4}-\\d{2}-\\d{2}T...``, and only the right 26 of them allow the
quote. So the search is given, for each pattern and format of the grammar, a short text that
matches it (:func:`witnesses`); it tries the endings of those texts (``"0000-00-00T..."``,
``"@a.aa"``, ``".aa"``...) before the quote, keeping one only if the grammar accepts it and the
quote after it. Nothing is trusted: a text that does not match (a regex feature sampled loosely
here) is simply never accepted by the grammar.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

__all__ = ["FORMAT_SAMPLES", "pattern_sample", "schema_texts", "witnesses"]

logger = logging.getLogger(__name__)

# Python's own regex parser (``re._parser`` from 3.11; ``sre_parse`` before, a deprecated alias since).
# JSON Schema patterns are ECMA-262 regexes, which it reads in all but rare corners; a sample it gets
# wrong is rejected by the grammar, never written.
try:
    _parser: Any = importlib.import_module("re._parser")
except ImportError:  # Python 3.10
    _parser = importlib.import_module("sre_parse")

FORMAT_SAMPLES: dict[str, str] = {
    "date-time": "2000-01-01T00:00:00Z",
    "date": "2000-01-01",
    "time": "00:00:00Z",
    "duration": "P1D",
    "email": "a@a.aa",
    "hostname": "a",
    "ipv4": "0.0.0.0",
    "ipv6": "::1",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "uri": "a:a",
}
"""A short valid text for each ``format`` llguidance enforces."""

_MAX_REPEAT = 64  # a sample longer than this is not worth writing to close a reply


def _pick(items: list[tuple[Any, Any]]) -> str:
    """A character of a class (``[a-z0-9]``, ``\\d``, ``[^"]``...), preferring plain ones."""
    negate = bool(items) and str(items[0][0]) == "NEGATE"
    allowed: set[int] = set()
    for op, arg in items[1:] if negate else items:
        name = str(op)
        if name == "LITERAL":
            allowed.add(arg)
        elif name == "RANGE":
            allowed.update(range(arg[0], min(arg[1], 0x7E) + 1))
        elif name == "CATEGORY":
            allowed.update(ord(c) for c in _CATEGORIES.get(str(arg), ""))
    preferred = "a0A-_. x"
    if negate:
        for char in preferred + "bcdefgh123":
            if ord(char) not in allowed:
                return char
        return ""
    for char in preferred:
        if ord(char) in allowed:
            return char
    printable = sorted(c for c in allowed if 0x20 <= c < 0x7F and chr(c) not in '"\\')
    return chr(printable[0]) if printable else (chr(min(allowed)) if allowed else "")


_CATEGORIES = {"CATEGORY_DIGIT": "0", "CATEGORY_NOT_DIGIT": "a", "CATEGORY_WORD": "a", "CATEGORY_NOT_WORD": "-",
               "CATEGORY_SPACE": " ", "CATEGORY_NOT_SPACE": "a"}


def _sample(items: Any, groups: dict[int, str]) -> str:
    """The shortest text the parsed regex ``items`` matches (as far as this reading of it goes)."""
    out: list[str] = []
    for op, arg in items:
        name = str(op)
        if name == "LITERAL":
            out.append(chr(arg))
        elif name == "NOT_LITERAL":
            out.append("a" if arg != ord("a") else "b")
        elif name == "ANY":
            out.append("a")
        elif name == "IN":
            out.append(_pick(list(arg)))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, _high, sub = arg
            if low > _MAX_REPEAT:
                raise ValueError("repeat too long")
            out.append(_sample(sub, groups) * low)
        elif name == "SUBPATTERN":
            text = _sample(arg[-1], groups)
            if arg[0] is not None:
                groups[arg[0]] = text
            out.append(text)
        elif name == "ATOMIC_GROUP":
            out.append(_sample(arg, groups))
        elif name == "BRANCH":
            out.append(min((_sample(branch, groups) for branch in arg[1]), key=len))
        elif name == "GROUPREF":
            out.append(groups.get(arg, ""))
        # AT (anchors), ASSERT / ASSERT_NOT (lookarounds): nothing to write
    return "".join(out)


def pattern_sample(pattern: str) -> str | None:
    """A short text matching the JSON Schema ``pattern`` (None if it cannot be read or is too long)."""
    try:
        text = _sample(_parser.parse(pattern), {})
    except (re.error, ValueError, TypeError, OverflowError, RecursionError) as exc:
        logger.debug("no sample for pattern %r: %s", pattern, exc)
        return None
    return text if len(text) <= _MAX_REPEAT else None


def schema_texts(node: Any) -> Iterator[str]:
    """Sample texts for every ``pattern``, ``format`` and ``patternProperties`` key in a schema."""
    if isinstance(node, dict):
        pattern, fmt = node.get("pattern"), node.get("format")
        if isinstance(pattern, str):
            sample = pattern_sample(pattern)
            if sample is not None:
                yield sample
        if isinstance(fmt, str) and fmt in FORMAT_SAMPLES:
            yield FORMAT_SAMPLES[fmt]
        keyed = node.get("patternProperties")
        if isinstance(keyed, dict):
            for key in keyed:
                sample = pattern_sample(key) if isinstance(key, str) else None
                if sample:
                    yield sample
        for value in node.values():
            yield from schema_texts(value)
    elif isinstance(node, list):
        for value in node:
            yield from schema_texts(value)


_JSON_GRAMMAR = re.compile(r'"json_schema"\s*:\s*|%json\s+')


def witnesses(grammar: str) -> tuple[bytes, ...]:
    """Sample texts for the patterned strings of a grammar's JSON schemas, JSON-escaped as the grammar
    writes them inside a string, shortest first (the schemas are read from the grammar's text: a
    ``{"grammars": [{"json_schema": ...}]}`` document or a Lark grammar's ``%json {...}`` rules)."""
    decoder = json.JSONDecoder()
    texts: set[str] = set()
    for match in _JSON_GRAMMAR.finditer(grammar):
        try:
            schema, _ = decoder.raw_decode(grammar, match.end())
        except ValueError:
            continue
        texts.update(schema_texts(schema))
    return tuple(sorted({json.dumps(t, ensure_ascii=False)[1:-1].encode() for t in texts if t},
                        key=lambda b: (len(b), b)))
