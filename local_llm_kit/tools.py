"""Tool and function definitions, how calls are prompted and written, and reading them back.

**Call formats.** When the model's chat template renders a ``tools`` list (Hugging Face
tool-use templates), the tools go to the template and calls are written in the model's own
format, discovered by rendering a probe conversation through the template (see
:func:`native_format`): e.g. Qwen/Hermes ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``.
Otherwise (SmolLM2, the Gemma fallback, most small models) the generic format is used:

* the tool schemas go into the system prompt (appended to the caller's system message, or as
  a new first message), with the instructions in :func:`tool_prompt`;
* each call is one line ``<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>``,
  several calls are separated by ``\\n``; the grammar enforces this envelope, the tool name and
  the arguments' JSON Schema, so what the model writes always parses;
* earlier calls in the history are rendered the same way inside the assistant's turn, and tool
  (or legacy ``function``) results become a user turn
  ``<tool_response name="NAME">\\n...\\n</tool_response>`` (consecutive results, and a user
  message right after them, share one turn), since most templates know only user/assistant.

**Choices.** ``"auto"`` lets the model write text, then optionally calls (text before a call
becomes ``message.content``); ``"required"`` and a named tool force calls from the first
token; ``"none"`` allows only text that contains no call envelope. ``parallel_tool_calls=False``
(and the legacy ``functions`` API) allows one call per reply.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.request import ChatRequest
from local_llm_kit.templates import ChatTemplate

__all__ = [
    "GENERIC_FORMAT",
    "CallFormat",
    "CallParser",
    "ToolPlan",
    "ToolSpec",
    "canonical_arguments",
    "native_format",
    "new_call_id",
    "parse_tool_request",
    "rewrite_history",
    "tool_prompt",
]

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
Choice = Literal["none", "auto", "required"]


@dataclass(frozen=True)
class ToolSpec:
    """One callable tool: its name, what it is for, and its arguments' JSON Schema."""

    name: str
    description: str | None
    parameters: dict[str, Any]
    strict: bool | None = None
    param: str = "tools"
    """Where it was defined in the request (``tools[1].function``), for error messages."""

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolPlan:
    """The validated tool part of a request."""

    tools: tuple[ToolSpec, ...]
    choice: Choice
    forced: str | None = None
    """The one tool the model must call (named tool_choice / function_call)."""
    parallel: bool = True
    legacy: bool = False
    """True for the ``functions`` / ``function_call`` API."""

    @property
    def callable_tools(self) -> tuple[ToolSpec, ...]:
        return tuple(t for t in self.tools if self.forced in (None, t.name))


def _dict(value: Any, where: str) -> dict[str, Any]:
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_none=True)
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{where} must be an object", param=where)
    return dict(value)


def _check_keys(value: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidRequestError(f"{where} has unsupported keys {unknown} (allowed: {sorted(allowed)})",
                                  param=f"{where}.{unknown[0]}")


def _function_spec(function: Mapping[str, Any], where: str, allowed: set[str]) -> ToolSpec:
    _check_keys(function, allowed, where)
    name = function.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequestError(f"{where}.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                                  param=f"{where}.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequestError(f"{where}.description must be a string", param=f"{where}.description")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(f"{where}.strict must be a boolean", param=f"{where}.strict")
    parameters = function.get("parameters")
    if parameters is None:  # OpenAI: no parameters means a function that takes none
        parameters = {"type": "object", "properties": {}, "additionalProperties": False}
    parameters = _dict(parameters, f"{where}.parameters")
    kind = parameters.get("type", "object")
    if kind != "object":
        raise InvalidRequestError(f"{where}.parameters must be a JSON Schema of type 'object', got type {kind!r}",
                                  param=f"{where}.parameters")
    return ToolSpec(name, description, {"type": "object", **parameters}, strict, where)


def parse_tool_request(request: ChatRequest) -> ToolPlan | None:
    """Validate tools/functions and the choice parameters; None when the request has no tools."""
    if request.tools is not None and request.functions is not None:
        raise InvalidRequestError("pass either tools or the legacy functions, not both", param="functions")
    if request.tools is None:
        for param, value in (("tool_choice", request.tool_choice),
                             ("parallel_tool_calls", request.parallel_tool_calls)):
            if value is not None:
                raise InvalidRequestError(f"{param} is only allowed when tools are given", param=param)
    if request.functions is None and request.function_call is not None:
        raise InvalidRequestError("function_call is only allowed when functions are given", param="function_call")
    if request.tools is not None:
        specs = []
        for i, tool in enumerate(request.tools):
            where = f"tools[{i}]"
            _check_keys(tool, {"type", "function"}, where)
            if tool.get("type") != "function":
                raise InvalidRequestError(f"{where}.type must be 'function', got {tool.get('type')!r}",
                                          param=f"{where}.type")
            specs.append(_function_spec(_dict(tool.get("function"), f"{where}.function"), f"{where}.function",
                                        {"name", "description", "parameters", "strict"}))
        choice, forced = _choice(request.tool_choice, specs, "tool_choice", legacy=False)
        parallel = True if request.parallel_tool_calls is None else request.parallel_tool_calls
        return ToolPlan(_unique(specs, "tools"), choice, forced, parallel)
    if request.functions is not None:
        specs = [_function_spec(f, f"functions[{i}]", {"name", "description", "parameters"})
                 for i, f in enumerate(request.functions)]
        choice, forced = _choice(request.function_call, specs, "function_call", legacy=True)
        return ToolPlan(_unique(specs, "functions"), choice, forced, parallel=False, legacy=True)
    return None


def _unique(specs: list[ToolSpec], param: str) -> tuple[ToolSpec, ...]:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise InvalidRequestError(f"{spec.param}.name {spec.name!r} is defined twice", param=f"{spec.param}.name")
        seen.add(spec.name)
    return tuple(specs)


def _choice(value: Any, specs: list[ToolSpec], param: str, *, legacy: bool) -> tuple[Choice, str | None]:
    names = [s.name for s in specs]
    modes = ("none", "auto") if legacy else ("none", "auto", "required")
    if value is None:
        return "auto", None
    if isinstance(value, str):
        if value not in modes:
            raise InvalidRequestError(f"{param} must be one of {list(modes)} or name a function, got {value!r}",
                                      param=param)
        return value, None  # type: ignore[return-value]
    choice = _dict(value, param)
    if legacy:
        _check_keys(choice, {"name"}, param)
        name = choice.get("name")
    else:
        _check_keys(choice, {"type", "function"}, param)
        if choice.get("type") != "function":
            raise InvalidRequestError(f"{param}.type must be 'function', got {choice.get('type')!r}",
                                      param=f"{param}.type")
        function = _dict(choice.get("function"), f"{param}.function")
        _check_keys(function, {"name"}, f"{param}.function")
        name = function.get("name")
    if name not in names:
        raise InvalidRequestError(f"{param} names {name!r}, which is not among the given functions {names}",
                                  param=param)
    return "required", name


# -- the call envelope ---------------------------------------------------------------------
@dataclass(frozen=True)
class CallFormat:
    """How one call is written: ``open + {"name": "...", "<args_key>": {...}} + close``."""

    open: str = "<tool_call>"
    close: str = "</tool_call>"
    separator: str | None = "\n"
    """Between consecutive calls; None when the format holds one call per reply."""
    args_key: str = "arguments"
    native: bool = False

    @property
    def head(self) -> str:
        return '{"name": "'

    @property
    def middle(self) -> str:
        return f'", "{self.args_key}": '

    def render(self, name: str, arguments: str) -> str:
        return f"{self.open}{self.head}{name}{self.middle}{canonical_arguments(arguments)}}}{self.close}"


GENERIC_FORMAT = CallFormat()


def canonical_arguments(arguments: str | Mapping[str, Any]) -> str:
    """Arguments laid out as the grammar writes them (``json.dumps`` style); bad JSON stays as is."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments
    return json.dumps(arguments, ensure_ascii=False)


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
        two = template.render([*user, {"role": "assistant", "content": "", "tool_calls": [call(1), call(2)]}],
                              add_generation_prompt=False, tools=tools)
    except Exception:  # a template that cannot render the probe cannot be trusted with calls
        return None
    if not (text.startswith(prompt) and one.startswith(prompt) and two.startswith(prompt)):
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
    obj2 = obj.replace(": 1}", ": 2}")
    replies = two[len(prompt):]
    first, second = f"{open_}{obj}{close}", f"{open_}{obj2}{close}{end_of_turn}"
    separator = None
    if replies.startswith(first) and replies.endswith(second):
        separator = replies[len(first): len(replies) - len(second)]
    return CallFormat(open_, close, separator, args_key, native=True)


def tool_prompt(plan: ToolPlan, fmt: CallFormat) -> str:
    """The system-prompt section describing the tools and the generic call format."""
    kind = "functions" if plan.legacy else "tools"
    lines = [f"# Tools\n\nYou can call the following {kind} to help answer the user. "
             "Their descriptions, with JSON Schemas of their arguments:", "<tools>"]
    lines += [json.dumps(tool.as_openai(), ensure_ascii=False) for tool in plan.tools]
    lines += ["</tools>", "", "To call one, reply with this line, filled in:",
              fmt.render("<name>", "<arguments as a JSON object>"),
              'Results come back in <tool_response name="..."></tool_response> blocks.']
    if plan.choice == "none":
        lines.append("Do not call any of them now: answer the user directly.")
    elif plan.forced is not None:
        lines.append(f"Call {plan.forced} now.")
    elif plan.choice == "required":
        lines.append("Call at least one of them now.")
    else:
        lines.append("Call one only when it helps; otherwise answer the user directly.")
    if plan.choice != "none" and (not plan.parallel or fmt.separator is None):
        lines.append("Make at most one call per reply.")
    return "\n".join(lines)


def rewrite_history(messages: Sequence[Mapping[str, Any]], fmt: CallFormat) -> list[dict[str, Any]]:
    """Messages with calls and tool results in roles and shapes the template can render.

    Native formats keep OpenAI's shape (``tool_calls`` with dict arguments, ``tool`` role);
    the generic format turns calls into assistant text and results into user turns.
    """
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    merge_next_user = False
    for message in messages:
        role = message["role"]
        calls = list(message.get("tool_calls") or ())
        if message.get("function_call"):
            calls.append({"id": f"call_fn_{len(out)}", "type": "function", "function": message["function_call"]})
        if role == "assistant" and calls:
            for call in calls:
                names[call["id"]] = call["function"]["name"]
            content = message.get("content") or ""
            if fmt.native:
                out.append({"role": "assistant", "content": content, "tool_calls": [
                    {"id": c["id"], "type": "function", "function": {
                        "name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}}
                    for c in calls]})
            else:
                rendered = (fmt.separator or "\n").join(
                    fmt.render(c["function"]["name"], c["function"]["arguments"]) for c in calls)
                out.append({"role": "assistant", "content": f"{content}\n{rendered}" if content else rendered})
            merge_next_user = False
        elif role in ("tool", "function"):
            call_id = message.get("tool_call_id") or next(
                (i for i, n in reversed(names.items()) if n == message.get("name")), "call_unknown")
            name = message.get("name") or names.get(call_id, "")
            if fmt.native:
                out.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": message["content"]})
                continue
            block = f'<tool_response name="{name}">\n{message["content"]}\n</tool_response>'
            if merge_next_user:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            merge_next_user = True
        elif role == "user" and merge_next_user:
            out[-1]["content"] += "\n\n" + message["content"]
            merge_next_user = False
        else:
            out.append({k: v for k, v in message.items() if k != "tool_calls"})
            merge_next_user = False
    return out


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


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
            end = self._scan_json(buf)
            piece = buf if end is None else buf[:end]
            if piece:
                events.append(("args", self._index, piece))
            self._buffer = "" if end is None else buf[end:]
            if end is not None:
                self._state = "close"
            return end is not None
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
