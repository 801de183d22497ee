"""The text of a tool call: its envelope, the model's own format, and reading calls back.

A call is always written ``open + {"name": "NAME", "<args_key>": {...}} + close``, several calls
separated by ``separator``: the generic format is ``<tool_call>{...}</tool_call>`` with calls
back to back; a model whose chat template renders tools gets the envelope its template writes
(:func:`native_format`). The grammar (:func:`local_llm_kit.constraints.tool_call_grammar`)
enforces the envelope, so :class:`CallParser` only has to track where it is in it, which lets
the same parser shape whole replies and stream deltas.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from local_llm_kit.errors import TemplateError
from local_llm_kit.templates import ChatTemplate

__all__ = ["GENERIC_FORMAT", "CallFormat", "CallParser", "Event", "canonical_arguments", "format_for",
           "native_format", "new_call_id"]

logger = logging.getLogger(__name__)

PROBE_ERRORS = (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError)
"""What a chat template raises on a conversation it does not accept (its own ``raise_exception``, or
Jinja tripping over data shaped differently than it expects). Anything else is a bug and propagates."""


@dataclass(frozen=True)
class CallFormat:
    """How one call is written: ``open + {"name": "...", "<args_key>": {...}} + close``."""

    open: str = "<tool_call>"
    close: str = "</tool_call>"
    separator: str | None = ""
    """Between consecutive calls; None when the format holds one call per reply. The generic
    format writes calls back to back: with a newline between them SmolLM2 repeated its call
    until ``max_tokens`` in 4 of 4 probes, with none it ended after its call in all 4."""
    args_key: str = "arguments"
    native: bool = False

    @property
    def head(self) -> str:
        return '{"name": "'

    @property
    def middle(self) -> str:
        return f'", "{self.args_key}": '

    def render(self, name: str, arguments: str) -> str:
        """One call as the model writes it (for history); the name is escaped as a JSON string."""
        escaped = json.dumps(name, ensure_ascii=False)[1:-1]
        return f"{self.open}{self.head}{escaped}{self.middle}{canonical_arguments(arguments)}}}{self.close}"


GENERIC_FORMAT = CallFormat()


def canonical_arguments(arguments: str | Mapping[str, Any]) -> str:
    """Arguments laid out as the grammar writes them (``json.dumps`` style); bad JSON stays as is."""
    value: Any = arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return arguments
    return json.dumps(value, ensure_ascii=False)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


_PROBE_TOOL = {"type": "function", "function": {"name": "probe_fn", "description": "probe",
                                                "parameters": {"type": "object", "properties": {
                                                    "probe_arg": {"type": "integer"}}}}}


def native_format(template: ChatTemplate) -> CallFormat | None:
    """The model's own call format, read off its template by rendering probe calls; None if unusable.

    Only formats that write each call as one JSON object ``{"name": ..., "<args>": {...}}``
    between fixed markers are recognised; anything else falls back to the generic format.
    """
    if not template.renders_tools:
        return None
    tools = [_PROBE_TOOL]
    user = [{"role": "user", "content": "probe"}]

    def call(n: int) -> dict[str, Any]:
        return {"id": f"call_probe{n}", "type": "function",
                "function": {"name": "probe_fn", "arguments": {"probe_arg": n}}}

    try:
        prompt = template.render(user, tools=tools)
        text = template.render([*user, {"role": "assistant", "content": "PROBE_TEXT"}],
                               add_generation_prompt=False, tools=tools)
        one = template.render([*user, {"role": "assistant", "content": "", "tool_calls": [call(1)]}],
                              add_generation_prompt=False, tools=tools)
    except PROBE_ERRORS as exc:  # a template that cannot render the probe cannot be trusted with calls
        logger.info("the chat template cannot render a tool call (%s: %s); using the generic call format",
                    type(exc).__name__, exc)
        return None
    if not (text.startswith(prompt) and one.startswith(prompt)):
        return None
    end_of_turn = text[len(prompt):].partition("PROBE_TEXT")[2]
    reply = one[len(prompt):]
    if not end_of_turn or not reply.endswith(end_of_turn):
        return None
    reply = reply[: len(reply) - len(end_of_turn)]
    for args_key in ("arguments", "parameters"):
        obj = f'{{"name": "probe_fn", "{args_key}": {{"probe_arg": 1}}}}'
        if reply.count(obj) == 1:
            open_, close = reply.split(obj)
            break
    else:
        return None
    if not open_.strip():  # without a marker, text and a call cannot be told apart as they start
        return None
    return CallFormat(open_, close, _separator(template, prompt, call, open_ + obj + close, end_of_turn),
                      args_key, native=True)


_formats: dict[tuple[str, str, str], CallFormat] = {}
_formats_lock = threading.Lock()


def format_for(template: ChatTemplate) -> CallFormat:
    """The call format for a template: its own when recognisable, else the generic one (cached)."""
    key = (template.source, template.bos_token, template.eos_token)
    with _formats_lock:
        fmt = _formats.get(key)
    if fmt is None:
        fmt = native_format(template) or GENERIC_FORMAT
        with _formats_lock:
            _formats[key] = fmt
    return fmt


def _separator(template: ChatTemplate, prompt: str, call: Any, first: str, end_of_turn: str) -> str | None:
    """What the template writes between two calls; None if it cannot write two (one call per reply)."""
    try:
        two = template.render([{"role": "user", "content": "probe"},
                               {"role": "assistant", "content": "", "tool_calls": [call(1), call(2)]}],
                              add_generation_prompt=False, tools=[_PROBE_TOOL])
    except PROBE_ERRORS as exc:  # e.g. "This model only supports single tool-calls at once!"
        logger.info("the chat template writes one call per reply (%s)", exc)
        return None
    replies = two[len(prompt):]
    second = first.replace('"probe_arg": 1}', '"probe_arg": 2}') + end_of_turn
    if two.startswith(prompt) and replies.startswith(first) and replies.endswith(second):
        return replies[len(first): len(replies) - len(second)]
    return None


# -- reading calls back --------------------------------------------------------------------
Event = tuple[str, int, str]
"""("content", -1, text) | ("call", index, name) | ("args", index, fragment)"""


@dataclass
class CallParser:
    """Splits generated text into content and calls, incrementally (streaming and whole alike).

    The grammar guarantees the text's shape, so the parser only tracks where it is; it holds
    back text that may be the start of a call marker, and whitespace right before a call.
    ``content`` is "text" (free text, then calls), "json" (a JSON value or calls, decided by
    the first characters) or "none" (calls only).
    """

    fmt: CallFormat
    content: Literal["text", "json", "none"] = "text"
    _buffer: str = ""
    _state: str = "content"
    _index: int = -1
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _decided: bool = False
    _raw: bool = False
    """True once JSON content was seen: everything after it is content."""
    names: list[str] = field(default_factory=list)

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        events = self.feed("")
        if self._state == "content" and self._buffer:
            events.append(("content", -1, self._buffer))
            self._buffer = ""
        return events

    def _expect(self, literal: str, next_state: str) -> bool:
        if len(self._buffer) < len(literal):
            return False
        self._buffer = self._buffer[len(literal):]  # the grammar wrote exactly this
        self._state = next_state
        return True

    def _step(self, events: list[Event]) -> bool:
        buf, fmt = self._buffer, self.fmt
        if self._state == "content":
            if self._raw:
                if buf:
                    events.append(("content", -1, buf))
                self._buffer = ""
                return False
            if self.content == "none" or (self.content == "json" and not self._decided):
                if buf.startswith(fmt.open) or (self.content == "none" and buf):
                    self._decided, self._state = True, "open"
                    return True
                if fmt.open.startswith(buf):
                    return False
                self._decided = self._raw = True
                return True
            at = buf.find(fmt.open)
            if at >= 0:
                if buf[:at].rstrip():
                    events.append(("content", -1, buf[:at].rstrip()))
                self._buffer, self._state = buf[at:], "open"
                return True
            safe = len(buf) - _partial_suffix(buf, fmt.open)
            safe = len(buf[:safe].rstrip())
            if safe:
                events.append(("content", -1, buf[:safe]))
                self._buffer = buf[safe:]
            return False
        if self._state == "open":
            return self._expect(fmt.open + fmt.head, "name")
        if self._state == "name":
            end = buf.find('"')
            if end < 0:
                return False
            self._index += 1
            self.names.append(buf[:end])
            events.append(("call", self._index, buf[:end]))
            self._buffer, self._state = buf[end:], "middle"
            self._depth, self._in_string, self._escaped = 0, False, False
            return True
        if self._state == "middle":
            return self._expect(fmt.middle, "args")
        if self._state == "args":
            stop = self._scan_json(buf)
            piece = buf if stop is None else buf[:stop]
            if piece:
                events.append(("args", self._index, piece))
            self._buffer = "" if stop is None else buf[stop:]
            if stop is not None:
                self._state = "close"
            return stop is not None
        if self._state == "close":
            return self._expect("}" + fmt.close, "between")
        if self._state == "between":
            sep = fmt.separator or ""
            if len(buf) < len(sep) + 1:
                return False
            return self._expect(sep, "open")
        return False

    def _scan_json(self, text: str) -> int | None:
        """Index just past the end of the arguments object in ``text``, or None if it goes on."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0
