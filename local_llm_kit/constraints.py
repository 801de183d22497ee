"""Grammars for structured output, compiled once per content, applied as per-token masks.

Every structured mode (JSON output, tool calls) becomes one llguidance grammar: a JSON Schema
for ``response_format``, a Lark grammar with inline ``%json`` schemas for tool calls
(:func:`tool_call_grammar`). A grammar is compiled for the model's tokenizer once and kept in
a small LRU cache keyed by its text, so a request that repeats a schema or a tool set pays a
cache hit and a matcher copy (~0.07 ms) instead of a compile (0.5 ms typical, tens of ms for
the largest schemas of JSONSchemaBench; see ``benchmarks/bench_structured.py``).

:class:`GrammarConstraint` implements the decode loop's
:class:`~local_llm_kit.decoding.Constraint`. Its cost per token is kept small because:

* the loop first asks :meth:`~GrammarConstraint.allows` whether the sampled token is fine —
  one lexer step — and builds the full vocabulary mask only when the grammar rejects it. That
  is exact for greedy and pure-temperature sampling (with ``top_p < 1`` the nucleus is taken
  before the grammar, as llama.cpp's grammar sampler does); a full mask over free text costs up
  to milliseconds on Gemma's 262k vocabulary, the check a few microseconds. With ``logprobs``
  the mask is always applied first, so the reported probabilities are the constrained ones;
* a mask, when needed, is computed straight into a preallocated int32 bitmask and applied
  with a sparse scatter when few tokens are allowed (the usual case inside JSON) or one
  vectorised ``copyto`` otherwise, never ``llguidance.numpy``'s ``np.repeat`` kernel;
* forced continuations (``{"name": "``, closing brackets, required keys) come from
  ``compute_ff_tokens`` and are evaluated in one forward pass without sampling; the first
  token of a forced prefix is the canonical one too.

JSON is generated compactly with ``", "`` and ``": "`` separators (the form ``json.dumps``
writes and models have seen most), and no free whitespace, which would let a small model loop
on newlines until ``max_tokens``. A schema may override this with its own ``x-guidance`` key.

Objects that list ``properties`` but say nothing of ``additionalProperties`` get no extra
properties (:func:`close_objects`), as llama.cpp's schema converter does: the output still
validates against the schema as written, and small models stop inventing keys (SmolLM2 filled
a forced ``get_time`` call with made-up ``type`` and ``description`` arguments before this).
Schemas using ``allOf`` or ``unevaluatedProperties`` are left as they are, since closing one
side of an intersection could forbid what the other side requires.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from local_llm_kit.closing import MAX_COMPLETION_TOKENS, RepetitionGuard, closer_for
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.witnesses import witnesses

__all__ = [
    "JSON_OPTIONS",
    "CallSyntax",
    "CompiledGrammar",
    "close_objects",
    "ConstraintStats",
    "GrammarCache",
    "GrammarConstraint",
    "grammar_cache",
    "inline_json",
    "json_schema_grammar",
    "lark_string",
    "regex_escape",
    "tool_call_grammar",
]

logger = logging.getLogger(__name__)

JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How generated JSON is laid out (see the module docstring)."""

# Budget-aware closing: every token is checked exactly once the budget left is within a margin of
# what the completion needs; farther away the completion is re-checked every _REFRESH tokens. One
# token can make the completion grow by a whole new structure (a new call, a new array item), so
# the margin holds several times the shortest whole reply and the current completion.
_MARGIN = 64
_REFRESH = 8


def _margin(length: int, shortest: int) -> int:
    return _MARGIN + 2 * length + 2 * shortest


# Characters with a meaning in llguidance's (Rust) regex syntax, plus the Lark delimiter.
_REGEX_META = set("\\.+*?()|[]{}^$#&-~/")


def lark_string(text: str) -> str:
    """``text`` as a Lark string literal (llguidance reads these with JSON escapes)."""
    return json.dumps(text, ensure_ascii=False)


def regex_escape(text: str) -> str:
    """``text`` as a literal inside a Lark ``/regex/`` (Python's re.escape targets another dialect)."""
    controls = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return "".join(controls.get(c) or ("\\" + c if c in _REGEX_META else c) for c in text)


def _with_layout(schema: Mapping[str, Any] | bool) -> dict[str, Any] | bool:
    if isinstance(schema, bool):
        return schema
    result = dict(close_objects(schema))
    result["x-guidance"] = {**JSON_OPTIONS, **dict(schema.get("x-guidance") or {})}
    return result


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_VALUES = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
                  "additionalProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
# Keywords next to which closing an object could change what is valid (or make it unsatisfiable).
_KEEP_OPEN = {"additionalProperties", "patternProperties", "unevaluatedProperties", "anyOf", "oneOf", "$ref",
              "if", "dependencies", "dependentSchemas", "dependentRequired", "minProperties", "maxProperties"}


def close_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on plain objects (see the module docstring)."""
    if "allOf" in json.dumps(schema) or "unevaluatedProperties" in json.dumps(schema):
        return schema
    return _close(schema)


def _close(node: Any) -> Any:
    if not isinstance(node, Mapping):
        return node
    result = dict(node)
    for key in _SCHEMA_MAPS:
        if isinstance(result.get(key), Mapping):
            result[key] = {name: _close(sub) for name, sub in result[key].items()}
    for key in _SCHEMA_VALUES:
        if isinstance(result.get(key), Mapping):
            result[key] = _close(result[key])
    for key in _SCHEMA_LISTS:
        if isinstance(result.get(key), list):
            result[key] = [_close(sub) for sub in result[key]]
    properties = result.get("properties")
    required = result.get("required", [])
    if (isinstance(properties, Mapping) and not _KEEP_OPEN.intersection(result)
            and isinstance(required, list) and set(required) <= set(properties)):
        result["additionalProperties"] = False
    return result


def json_schema_grammar(schema: Mapping[str, Any] | bool) -> str:
    """The llguidance grammar for JSON matching ``schema``, in the compact layout."""
    return str(llguidance.LLMatcher.grammar_from_json_schema(json.dumps(_with_layout(schema))))


def inline_json(schema: Mapping[str, Any] | bool) -> str:
    """A ``%json`` non-terminal for a Lark grammar, in the compact layout."""
    return "%json " + json.dumps(_with_layout(schema), ensure_ascii=False)


@dataclass(frozen=True)
class CallSyntax:
    """The fixed text around one call, as grammar terminals (see :class:`local_llm_kit.calls.CallFormat`)."""

    open: str
    close: str
    separator: str | None
    args_key: str
    open_token: int | None = None
    """Set when ``open`` is one special token of the model (written ``<[id]>`` in the grammar)."""
    close_token: int | None = None


def tool_call_grammar(tools: Sequence[tuple[str, Mapping[str, Any]]], syntax: CallSyntax, *,
                      content: Literal["text", "json", "none", "forbid"], parallel: bool,
                      content_schema: Mapping[str, Any] | None = None, max_calls: int = 8) -> str:
    """A Lark grammar for a reply made of tool calls, optionally after (or instead of) content.

    ``content``: "none" means calls only; "text" free text, then optionally calls; "json" a JSON
    value matching ``content_schema`` or calls; "forbid" free text in which no call can start.
    Each call is ``open {"name": "<one of tools>", "<args_key>": <its schema>} close``; with
    ``parallel`` (and a format that can write several) up to ``max_calls`` follow each other.
    """
    open_ = f"<[{syntax.open_token}]>" if syntax.open_token is not None else lark_string(syntax.open)
    close = f"<[{syntax.close_token}]>" if syntax.close_token is not None else lark_string(syntax.close)
    many = parallel and syntax.separator is not None and max_calls > 1
    rest = ""
    if many:  # nested optionals: at most max_calls - 1 more calls
        more = f"{lark_string(syntax.separator or '')} {open_} body {close}"
        for _ in range(max_calls - 1):
            rest = f" ({more}{rest})?"
    if syntax.open_token is not None:  # free text cannot produce a special token: no lookahead needed
        text_rule, head_rule, with_calls = "TEXT: /(?s:.+)/", None, "TEXT? calls"
    else:
        marker = regex_escape(syntax.open)
        text_rule = f"TEXT: /(?s:.+)/ & ~/(?s:.*){marker}(?s:.*)/"
        # Lazy: the text ends at the first marker, which the call then continues.
        head_rule, with_calls = f"head[lazy]: /(?s:.*){marker}/", f"head body {close}{rest}"
    lines = ["%llguidance {}"]
    if content == "forbid":
        return "\n".join([*lines, "start: TEXT?", text_rule])
    if content == "none":
        lines.append("start: calls")
    elif content == "text":
        lines += [f"start: TEXT | {with_calls}", text_rule]
        if head_rule is not None:
            lines.append(head_rule)
    else:
        lines += ["start: content | calls", f"content: {inline_json(content_schema or {'type': 'object'})}"]
    if content != "text" or head_rule is None:
        lines.append(f"calls: {open_} body {close}{rest}")
    lines.append("body: " + " | ".join(f"fn{i}" for i in range(len(tools))))
    for i, (name, schema) in enumerate(tools):
        head = lark_string(f'{{"name": "{name}", "{syntax.args_key}": ')
        lines += [f'fn{i}: {head} args{i} "}}"', f"args{i}: {inline_json(schema)}"]
    return "\n".join(lines)


class CompiledGrammar:
    """A grammar compiled for one tokenizer; hands out fresh matchers cheaply."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, matcher: llguidance.LLMatcher,
                 compile_seconds: float) -> None:
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.compile_seconds = compile_seconds
        self._prototype = matcher
        self._shortest: dict[tuple[int, frozenset[int]], tuple[int, ...] | None] = {}
        self._narrower: tuple[CompiledGrammar, ...] = ()
        self._tails: tuple[tuple[int, ...], ...] | None = None
        self._lock = threading.Lock()

    @property
    def tails(self) -> tuple[tuple[int, ...], ...]:
        """Token sequences that can end the grammar's patterned strings (see :mod:`local_llm_kit.witnesses`)."""
        if self._tails is None:
            self._tails = closer_for(self.tokenizer).tails(witnesses(self.grammar))
        return self._tails

    def matcher(self) -> llguidance.LLMatcher:
        """A matcher at the grammar's start (a copy of the compiled prototype, ~5 µs)."""
        return self._prototype.deep_copy()

    def add_narrower(self, grammars: Sequence[CompiledGrammar]) -> None:
        """Grammars whose every reply this one accepts too (one call of one tool, for a grammar of
        several tools and calls): their shortest replies are candidates for this one's.

        The closing search is greedy: where the grammar offers a choice (which tool to call) it takes
        the first by its ranking, not the one that ends soonest. Searching each alternative alone
        finds the shortest one call, which is both the ``max_tokens`` check's minimum and the path the
        budget-aware closing steers to. Set once per grammar text (the same text gets the same list)."""
        with self._lock:
            if not self._narrower:
                self._narrower = tuple(grammars)
                self._shortest.clear()

    def shortest_reply(self, n_vocab: int, eos_token_ids: Collection[int]) -> tuple[int, ...] | None:
        """The tokens of the shortest reply found that the grammar accepts (None: none found); cached."""
        excluded = frozenset(eos_token_ids) | frozenset(self.tokenizer.eos_tokens)
        key = (n_vocab, excluded)
        with self._lock:
            if key in self._shortest:
                return self._shortest[key]
            narrower = self._narrower
        closer = closer_for(self.tokenizer)
        limit = min(n_vocab, self.tokenizer.vocab_size)
        found = closer.shortest(self._prototype, excluded, limit, tails=self.tails)
        candidates = [] if found is None else [tuple(found)]
        end = self.tokenizer.eos_tokens[0]
        for grammar in narrower:
            path = grammar.shortest_reply(n_vocab, eos_token_ids)
            # Accepted here too (it should be by construction; checked, since a wrong path would be
            # steered to): the path, then an end token, which only an accepting state allows.
            if path is not None and self._prototype.validate_tokens([*path, end]) == len(path) + 1:
                candidates.append(path)
        result = min(candidates, key=len) if candidates else None
        with self._lock:
            self._shortest[key] = result
        return result

    def min_tokens(self, n_vocab: int, eos_token_ids: Collection[int]) -> int | None:
        """Tokens of the shortest reply found that the grammar accepts (None: none found); cached."""
        path = self.shortest_reply(n_vocab, eos_token_ids)
        return None if path is None else len(path)


class GrammarCache:
    """Compiled grammars keyed by (tokenizer, grammar text); failures are remembered too."""

    def __init__(self, max_entries: int = 128) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, str], tuple[llguidance.LLTokenizer, CompiledGrammar | str]] = (
            OrderedDict())
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def compile(self, tokenizer: llguidance.LLTokenizer, grammar: str, *, param: str) -> CompiledGrammar:
        """The compiled grammar, or :class:`InvalidRequestError` naming ``param`` with the engine's reason."""
        result = self._lookup(tokenizer, grammar)
        if isinstance(result, str):
            raise InvalidRequestError(f"{param} cannot be enforced: {result}", param=param)
        return result

    def error(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> str | None:
        """The engine's reason for rejecting ``grammar``, or None when it compiles (and is now cached)."""
        result = self._lookup(tokenizer, grammar)
        return result if isinstance(result, str) else None

    def _lookup(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> CompiledGrammar | str:
        key = (id(tokenizer), grammar)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if entry is None:
            entry = (tokenizer, self._build(tokenizer, grammar))
            with self._lock:
                self.misses += 1
                self._entries[key] = entry  # the tokenizer is kept alive, so its id stays unique
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return entry[1]

    @staticmethod
    def _build(tokenizer: llguidance.LLTokenizer, grammar: str) -> CompiledGrammar | str:
        started = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        seconds = time.perf_counter() - started
        if matcher.is_error():
            error = matcher.get_error().strip()
            logger.debug("grammar rejected in %.1f ms: %s", seconds * 1e3, error)
            return _short_error(error)
        logger.debug("grammar compiled in %.1f ms", seconds * 1e3)
        return CompiledGrammar(tokenizer, grammar, matcher, seconds)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


def _short_error(error: str) -> str:
    # llguidance appends the whole grammar after the reason; users need the reason.
    return error.split("\n<state>")[0].split("\n<grammar>")[0].strip()


grammar_cache = GrammarCache()
"""The process-wide cache every request compiles through."""


@dataclass
class ConstraintStats:
    """Per-token timings of one constrained generation (for benchmarks; off by default)."""

    step_seconds: list[float] = field(default_factory=list)
    """Constraint time per sampled token: the check, any mask, the consume and fast-forward."""
    mask_seconds: list[float] = field(default_factory=list)
    """Time of each full mask that had to be built (computing plus applying it)."""
    forced_tokens: int = 0
    sampled_tokens: int = 0


class GrammarConstraint:
    """Keeps one generation inside a grammar (the decode loop's ``Constraint``).

    ``n_vocab`` is the length of the logits the backend returns; it may differ from the
    tokenizer's vocabulary (padded embedding matrices): logits past the vocabulary are never
    allowed, vocabulary entries past the logits are ignored. End-of-sequence tokens are allowed
    exactly when the grammar may end; ``eos_token_ids`` are the backend's (the loop stops on
    them), and end tokens only the grammar's tokenizer knows are never allowed.
    """

    stats: ConstraintStats | None = None
    """Set (on the class) to a :class:`ConstraintStats` to record timings of later generations."""

    def __init__(self, compiled: CompiledGrammar, n_vocab: int, eos_token_ids: Collection[int], *,
                 repetition_guard: int = 0) -> None:
        self._matcher = compiled.matcher()
        vocab = compiled.tokenizer.vocab_size
        self._n_vocab = n_vocab
        self._n = min(vocab, n_vocab)
        self._bitmask = llg_numpy.allocate_token_bitmask(1, vocab)
        self._words = self._bitmask[0]
        self._bytes = self._words.view(np.uint8)
        grammar_eos = set(compiled.tokenizer.eos_tokens)
        backend_eos = {t for t in eos_token_ids if 0 <= t < n_vocab}
        self._eos = frozenset(backend_eos)
        self._extra_eos = np.array(sorted(backend_eos - grammar_eos), dtype=np.int64)
        foreign = sorted(t for t in grammar_eos - backend_eos if t < self._n)
        self._foreign_eos = np.array(foreign, dtype=np.int64)
        self._forced_first = self._take_forced()
        self._stats = GrammarConstraint.stats
        self._step_started: float | None = None
        # Budget-aware closing (see fit()): a known valid completion from the current state.
        self._closer = closer_for(compiled.tokenizer)
        self._tails = compiled.tails
        self._excluded = frozenset(backend_eos | grammar_eos)
        self._path: list[int] | None = None
        """Tokens that complete the reply from the current state; None when not known now."""
        self._last_path: list[int] | None = None
        """The last completion found: often still valid a few tokens later (inside a string)."""
        self._known = 0
        self._stale = _REFRESH
        self._wait = 0
        """Tokens to let pass before searching again after a search failed (doubles each time)."""
        self._trial: tuple[int, list[int], list[int]] | None = None
        shortest = compiled.shortest_reply(n_vocab, eos_token_ids)
        self._shortest = 0 if shortest is None else len(shortest)
        if shortest is not None:  # the first completion to steer to (it may take a branch the greedy search does not)
            self._path, self._last_path = list(shortest), list(shortest)
            self._known, self._stale = len(shortest), 0
        self._grammar_eos = compiled.tokenizer.eos_tokens[0]
        # The opt-in repetition guard: once it fires, the reply is closed as if the budget left were
        # just what the completion takes (``_cap``, counted down as tokens are consumed).
        self._guard = RepetitionGuard(repetition_guard) if repetition_guard else None
        self._cap: int | None = None

    def _take_forced(self) -> list[int]:
        return self._forced_by(self._matcher)

    def _forced_by(self, matcher: llguidance.LLMatcher) -> list[int]:
        forced = list(matcher.compute_ff_tokens())
        for i, token in enumerate(forced):
            if token in self._eos:
                return forced[:i]
        return forced

    def _check(self) -> None:
        if self._matcher.is_error():
            raise RuntimeError(f"constrained decoding failed: {_short_error(self._matcher.get_error())}")

    # -- the Constraint protocol ------------------------------------------------------------
    def allows(self, token: int) -> bool:
        """Whether ``token`` may come next; a lexer step, far cheaper than a full mask."""
        if self._stats is not None and self._step_started is None:
            self._step_started = time.perf_counter()
        if self._forced_first:
            return token == self._forced_first[0]
        if token in self._eos:
            return self._matcher.is_accepting()
        if token >= self._n:
            return False
        return bool(self._matcher.validate_tokens([token]) == 1)

    def mask_logits(self, logits: np.ndarray) -> None:
        """Set every token the grammar forbids now to ``-inf``, in place."""
        started = time.perf_counter()
        if self._stats is not None and self._step_started is None:
            self._step_started = started
        if self._forced_first:
            keep = logits[self._forced_first[0]]
            logits.fill(-np.inf)
            logits[self._forced_first[0]] = keep
            return
        saved_eos = logits[self._extra_eos] if self._extra_eos.size else None
        llg_numpy.fill_next_token_bitmask(self._matcher, self._bitmask)
        self._check()
        self._apply(logits)
        if saved_eos is not None:
            logits[self._extra_eos] = saved_eos if self._matcher.is_accepting() else -np.inf
        if self._foreign_eos.size:
            logits[self._foreign_eos] = -np.inf
        if self._stats is not None:
            self._stats.mask_seconds.append(time.perf_counter() - started)

    def _apply(self, logits: np.ndarray) -> None:
        n = self._n
        allowed_words = np.flatnonzero(self._words)
        if allowed_words.size * 128 < n:
            # Few tokens allowed (inside JSON, almost always): gather them, blank the rest.
            packed = self._words[allowed_words].view(np.uint8)
            rows, cols = np.nonzero(np.unpackbits(packed, bitorder="little").reshape(-1, 32))
            ids = allowed_words[rows] * 32 + cols
            ids = ids[ids < n]
            keep = logits[ids]
            logits.fill(-np.inf)
            logits[ids] = keep
            return
        bits = np.unpackbits(self._bytes, count=n, bitorder="little")
        np.copyto(logits[:n], -np.inf, where=bits == 0)
        if logits.shape[0] > n:
            logits[n:] = -np.inf

    def consume(self, token: int) -> list[int]:
        """Advance past ``token``; return the forced continuation, already consumed."""
        if self._forced_first:
            self._forced_first.pop(0)
        if not self._matcher.consume_token(token):
            self._check()
            raise RuntimeError(f"constrained decoding failed: token {token} was not allowed")
        forced = self._take_forced()
        if forced and not self._matcher.consume_tokens(forced):
            self._check()
        self._forced_first = []
        self._advance_path(token, forced)
        if self._cap is not None:
            self._cap -= 1 + len(forced)
        elif self._guard is not None:
            self._watch(token, forced)
        if self._stats is not None:
            self._stats.sampled_tokens += 1
            self._stats.forced_tokens += len(forced)
            if self._step_started is not None:
                self._stats.step_seconds.append(time.perf_counter() - self._step_started)
            self._step_started = None
        return forced

    def is_complete(self) -> bool:
        """True once the grammar allows nothing but ending."""
        return bool(self._matcher.is_stopped())

    def draft_outputs(self, tokens: Sequence[int]) -> list[bool]:
        """Which logits verifying the draft ``tokens`` needs (see the ``Constraint`` protocol);
        nothing is consumed.

        Speculation drafts only what the grammar allows. End-of-sequence tokens end the draft: the
        loop stops on them, so drafting one gains nothing. A drafted position whose next token the
        grammar forces (a key's closing quote and the next key, in JSON) needs no logits; with a
        large vocabulary they are much of a verification pass."""
        count = 0
        for token in tokens:
            if token in self._eos or token >= self._n:
                break
            count += 1
        count = int(self._matcher.validate_tokens(list(tokens[:count]))) if count else 0
        outputs = [True]
        if count:
            trial = self._matcher.deep_copy()
            for token in tokens[:count]:
                trial.consume_token(token)
                outputs.append(not self._forced_by(trial))
        return outputs

    # -- budget-aware closing ---------------------------------------------------------------
    def fit(self, token: int, remaining: int) -> int | None:
        """The token to take when at most ``remaining`` tokens (this one included) may follow.

        ``token`` itself while the reply can still be completed after it within the budget;
        otherwise the next token of a completion found by :class:`~local_llm_kit.closing.Closer`,
        so the reply always ends accepted by the grammar. None: the reply is complete and nothing
        more fits (the loop then ends it). Far from the end of the budget this costs nothing; near
        it, one trial step of the matcher per token, and a completion search when the structure
        changed.
        """
        if token in self._eos:
            return token  # allowed only where the grammar may end
        if self._cap is not None:  # the repetition guard fired: close now
            remaining = min(remaining, self._cap)
        path = self._path
        if path is None:
            far = remaining - self._known > _margin(self._known, self._shortest)
            if (far and self._stale < _REFRESH) or self._stale < self._wait:
                return token
            path = self._refresh(remaining)
            if path is None:
                return token  # no completion found: nothing to steer to (logged by _refresh)
        if remaining - len(path) > _margin(len(path), self._shortest):
            return token
        if path and token == path[0]:
            return token
        after = self._try(token, remaining)
        if after is not None and 1 + len(after[0]) + len(after[1]) <= remaining:
            self._trial = (token, *after)
            return token
        return path[0] if path else None

    def _watch(self, token: int, forced: list[int]) -> None:
        assert self._guard is not None
        unit = self._guard.push([token, *forced])
        if unit is None:
            return
        path = self._path if self._path is not None else self._refresh()
        if path is None:
            return  # nothing to steer to (logged by _refresh); the guard watches on
        self._cap = len(path)
        logger.info("repetition guard: a sequence of %d token(s) repeated %d times; closing the reply in %d tokens",
                    unit, self._guard.repeats, len(path))

    def _valid(self, path: list[int]) -> bool:
        """Whether ``path`` takes the current state to an accepting one (the matcher is left as is).

        An end-of-sequence token can only follow an accepting state, so validating ``path`` plus one
        answers it without consuming anything (a few µs; consuming and rolling back costs ~0.5 ms)."""
        tokens = [*path, self._grammar_eos]
        return bool(self._matcher.validate_tokens(tokens) == len(tokens))

    def _completion(self, limit: int) -> list[int] | None:
        """A completion from the current state; the search stops past ``limit`` tokens (longer ones
        could not be steered to in the budget left anyway, and a search that fails costs its length)."""
        if self._valid([]):
            # Already where the reply may end (free text beside tools): ending is the shortest
            # completion. The last path would stay valid too (more text is still text), and a reply
            # cut by the budget would end with its first token, written for an empty text.
            return []
        if self._last_path is not None and self._valid(self._last_path):
            return list(self._last_path)
        return self._closer.complete(self._matcher, self._excluded, self._n, max_tokens=limit, tails=self._tails)

    def _refresh(self, remaining: int = MAX_COMPLETION_TOKENS) -> list[int] | None:
        path = self._completion(remaining)
        self._stale = 0
        if path is None:
            if not self._wait:
                logger.warning("no valid completion found from the current grammar state; the reply may be cut")
            # Searched again after 1, 2, 4... tokens: while the model stays in such a state (a string
            # whose pattern the search cannot satisfy), every search fails.
            self._wait = min(2 * self._wait or 1, _REFRESH * 8)
            self._known = 0
            return None
        self._wait = 0
        self._path = self._last_path = path
        self._known = len(path)
        return path

    def _try(self, token: int, remaining: int) -> tuple[list[int], list[int]] | None:
        """The forced tokens after ``token`` and a completion from there (the matcher is left as is)."""
        if not self._matcher.consume_token(token):
            self._check()
            return None
        forced = self._take_forced()
        steps = 1
        if forced and self._matcher.consume_tokens(forced):
            steps += len(forced)
        path = self._completion(remaining)
        self._matcher.rollback(steps)
        return None if path is None else (forced, path)

    def _advance_path(self, token: int, forced: list[int]) -> None:
        trial, self._trial = self._trial, None
        if trial is not None and trial[0] == token and trial[1] == forced:
            self._path = self._last_path = trial[2]
        elif self._path and self._path[0] == token and self._path[1:1 + len(forced)] == forced:
            self._path = self._last_path = self._path[1 + len(forced):]
        else:
            self._path = None
            self._stale += 1
            return
        self._known, self._stale = len(self._path), 0
