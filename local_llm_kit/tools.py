"""Tool and function definitions, their validation, and how tools and calls are prompted.

**Call formats.** When the model's chat template renders a ``tools`` list (Hugging Face
tool-use templates), the tools go to the template and calls are written in the model's own
format, discovered by rendering a probe conversation through the template (see
:func:`local_llm_kit.calls.native_format`), e.g. Qwen/Hermes
``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``.
Otherwise (SmolLM2, the Gemma fallback, most small models) the generic format is used:

* the tool schemas go into the system prompt (appended to the caller's system message, or as
  a new first message), with the instructions in :func:`tool_prompt`;
* each call is ``<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>``, several calls
  follow each other directly; the grammar enforces this envelope, the tool name and the
  arguments' JSON Schema, so what the model writes always parses;
* earlier calls in the history are rendered the same way inside the assistant's turn, and tool
  (or legacy ``function``) results become a user turn
  ``<tool_response name="NAME">\\n...\\n</tool_response>`` (consecutive results, and a user
  message right after them, share one turn), since most templates know only user/assistant.

**Choices.** ``"auto"`` lets the model write text, then optionally calls (text before a call
becomes ``message.content``); ``"required"`` forces calls from the first token; a named tool
forces exactly one call of that function, as OpenAI does; ``"none"`` allows only text that
contains no call envelope. ``parallel_tool_calls=False`` (and the legacy ``functions`` API)
allows one call per reply; otherwise a reply holds at most :data:`MAX_PARALLEL_CALLS` calls, so a
model that repeats calls ends at that bound rather than at ``max_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from local_llm_kit.calls import CallFormat
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.formats import NAME_RE

__all__ = ["MAX_PARALLEL_CALLS", "NAME_RE", "ToolPlan", "ToolSpec", "parse_tools", "rewrite_history",
           "tool_prompt"]

Choice = Literal["none", "auto", "required"]
MAX_PARALLEL_CALLS = 8
"""The most calls one reply may hold with ``parallel_tool_calls`` (the grammar ends the reply there)."""


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

    @property
    def max_calls(self) -> int:
        """Calls one reply may hold: one for a named choice or without parallel calls."""
        return 1 if self.forced is not None or not self.parallel else MAX_PARALLEL_CALLS


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
        raise InvalidRequestError(
            f"{where}.parameters must be a JSON Schema of type 'object', got type {kind!r}",
            param=f"{where}.parameters")
    return ToolSpec(name, description, {"type": "object", **parameters}, strict, where)


def parse_tools(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None,
                functions: Sequence[Mapping[str, Any]] | None, function_call: Any) -> ToolPlan | None:
    """Validate tools/functions and the choice parameters; None when the request has no tools."""
    if tools is not None and functions is not None:
        raise InvalidRequestError("pass either tools or the legacy functions, not both", param="functions")
    if tools is None:
        for param, value in (("tool_choice", tool_choice), ("parallel_tool_calls", parallel_tool_calls)):
            if value is not None:
                raise InvalidRequestError(f"{param} is only allowed when tools are given", param=param)
    if functions is None and function_call is not None:
        raise InvalidRequestError("function_call is only allowed when functions are given",
                                  param="function_call")
    if tools is not None:
        specs = []
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            _check_keys(tool, {"type", "function"}, where)
            if tool.get("type") != "function":
                raise InvalidRequestError(f"{where}.type must be 'function', got {tool.get('type')!r}",
                                          param=f"{where}.type")
            specs.append(_function_spec(_dict(tool.get("function"), f"{where}.function"), f"{where}.function",
                                        {"name", "description", "parameters", "strict"}))
        choice, forced = _choice(tool_choice, specs, "tool_choice", legacy=False)
        parallel = True if parallel_tool_calls is None else parallel_tool_calls
        return ToolPlan(_unique(specs, "tools"), choice, forced, parallel)
    if functions is not None:
        specs = [_function_spec(_dict(f, f"functions[{i}]"), f"functions[{i}]", {"name", "description", "parameters"})
                 for i, f in enumerate(functions)]
        choice, forced = _choice(function_call, specs, "function_call", legacy=True)
        return ToolPlan(_unique(specs, "functions"), choice, forced, parallel=False, legacy=True)
    return None


def _unique(specs: list[ToolSpec], param: str) -> tuple[ToolSpec, ...]:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise InvalidRequestError(f"{spec.param}.name {spec.name!r} is defined twice",
                                      param=f"{spec.param}.name")
        seen.add(spec.name)
    return tuple(specs)


def _choice(value: Any, specs: list[ToolSpec], param: str, *, legacy: bool) -> tuple[Choice, str | None]:
    names = [s.name for s in specs]
    modes = ("none", "auto") if legacy else ("none", "auto", "required")
    if value is None:
        return "auto", None
    if isinstance(value, str):
        if value not in modes:
            raise InvalidRequestError(
                f"{param} must be one of {list(modes)} or name a function, got {value!r}", param=param)
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
    if plan.choice != "none" and (plan.max_calls == 1 or fmt.separator is None):
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
            calls.append({"id": f"call_fn_{len(out)}", "type": "function",
                          "function": message["function_call"]})
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
                rendered = (fmt.separator or "").join(
                    fmt.render(c["function"]["name"], c["function"]["arguments"]) for c in calls)
                text = f"{content}\n{rendered}" if content else rendered
                out.append({"role": "assistant", "content": text})
            merge_next_user = False
        elif role in ("tool", "function"):
            call_id = message.get("tool_call_id") or next(
                (i for i, n in reversed(names.items()) if n == message.get("name")), "call_unknown")
            name = message.get("name") or names.get(call_id, "")
            if fmt.native:
                out.append({"role": "tool", "tool_call_id": call_id, "name": name,
                            "content": message["content"]})
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
