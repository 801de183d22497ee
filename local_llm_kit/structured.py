"""Output modes for structured requests: JSON (``response_format``) and tool / function calls.

:func:`select_output_mode` turns a validated request into one :class:`StructuredOutput` (or
plain text): it validates ``response_format``, ``tools``/``tool_choice``/``parallel_tool_calls``
and the legacy ``functions``/``function_call``, compiles the grammar that guarantees the reply's
shape (an uncompilable schema raises :class:`~local_llm_kit.errors.InvalidRequestError`; there
is never a silent fallback to unconstrained text), and shapes what the model wrote into
``message.content`` / ``message.tool_calls`` / ``message.function_call``, whole or as deltas.
Whole replies are built by running the streaming parser over the whole text, so a stream's
concatenated deltas always equal the non-streamed message.

JSON modes add a short instruction to the system prompt ("respond with JSON", plus the schema
when it is at most :data:`MAX_SCHEMA_PROMPT_CHARS` long); small models write far better values
when they know a JSON reply is expected. ``stop`` cannot be combined with JSON or tool-call
output: a stop string could cut the structure the grammar guarantees.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from local_llm_kit.calls import GENERIC_FORMAT, CallFormat, CallParser, native_format, new_call_id
from local_llm_kit.constraints import (
    CallSyntax,
    CompiledGrammar,
    GrammarConstraint,
    grammar_cache,
    json_schema_grammar,
    tool_call_grammar,
)
from local_llm_kit.decoding import Constraint
from local_llm_kit.engine import Engine
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.output import OutputMode, StreamShaper, TextOutput
from local_llm_kit.request import ChatRequest
from local_llm_kit.tools import NAME_RE, ToolPlan, parse_tool_request, rewrite_history, tool_prompt
from local_llm_kit.types import (
    Delta,
    FinishReason,
    FunctionCall,
    FunctionCallDelta,
    Message,
    ToolCall,
    ToolCallDelta,
)

__all__ = ["MAX_SCHEMA_PROMPT_CHARS", "JsonSpec", "StructuredOutput", "parse_response_format",
           "select_output_mode"]

MAX_SCHEMA_PROMPT_CHARS = 3000
"""Longer schemas are enforced but not repeated in the prompt (they would crowd a small context)."""


@dataclass(frozen=True)
class JsonSpec:
    """A validated JSON ``response_format``."""

    schema: dict[str, Any]
    name: str | None = None
    description: str | None = None
    any_object: bool = False
    """True for ``{"type": "json_object"}`` without a schema."""

    def instruction(self) -> str:
        if self.any_object:
            return "Respond only with a JSON object."
        text = json.dumps(self.schema, ensure_ascii=False, separators=(",", ":"))
        about = f" ({self.name}{': ' + self.description if self.description else ''})" if self.name else ""
        if len(text) > MAX_SCHEMA_PROMPT_CHARS:
            return f"Respond only with JSON{about}."
        return f"Respond only with JSON{about} that matches this JSON Schema:\n{text}"


def _keys(value: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidRequestError(f"{where} has unsupported keys {unknown} (allowed: {sorted(allowed)})",
                                  param="response_format")


def parse_response_format(value: Mapping[str, Any] | None) -> JsonSpec | None:
    """Validate ``response_format``; None means free text."""
    if value is None:
        return None
    kind = value.get("type")
    if kind == "text":
        _keys(value, {"type"}, "response_format")
        return None
    if kind == "json_object":  # "schema" is llama-cpp-python's extension
        _keys(value, {"type", "schema"}, "response_format")
        schema = value.get("schema")
        if schema is None:
            return JsonSpec({"type": "object"}, any_object=True)
        return JsonSpec(_schema(schema, "response_format.schema"))
    if kind == "json_schema":
        _keys(value, {"type", "json_schema"}, "response_format")
        spec: Any = value.get("json_schema")
        if hasattr(spec, "model_dump"):
            spec = spec.model_dump(exclude_none=True, by_alias=True)
        if not isinstance(spec, Mapping):
            raise InvalidRequestError("response_format.json_schema must be an object",
                                      param="response_format")
        _keys(spec, {"name", "schema", "strict", "description"}, "response_format.json_schema")
        name = spec.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidRequestError(
                "response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'",
                param="response_format")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise InvalidRequestError("response_format.json_schema.strict must be a boolean",
                                      param="response_format")
        description = spec.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError("response_format.json_schema.description must be a string",
                                      param="response_format")
        schema = spec.get("schema")
        if schema is None:
            return JsonSpec({"type": "object"}, name, description, any_object=True)
        return JsonSpec(_schema(schema, "response_format.json_schema.schema"), name, description)
    raise InvalidRequestError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        param="response_format")


def _schema(schema: Any, where: str) -> dict[str, Any]:
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"{where} must be a JSON Schema object", param="response_format")
    try:
        return dict(json.loads(json.dumps(schema)))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{where} is not JSON-serialisable: {exc}",
                                  param="response_format") from exc


# -- the output mode -----------------------------------------------------------------------
class StructuredOutput:
    """One request's prompt additions, grammar and result shaping (an ``OutputMode``)."""

    def __init__(self, engine: Engine, *, fmt: CallFormat, plan: ToolPlan | None, json_spec: JsonSpec | None,
                 grammar: CompiledGrammar | None) -> None:
        self.fmt = fmt
        self.plan = plan
        self.json_spec = json_spec
        self._grammar = grammar
        self._n_vocab = engine.backend.info.n_vocab
        self._eos = engine.backend.info.eos_token_ids
        native_tools = plan is not None and fmt.native
        self.template_tools = [t.as_openai() for t in plan.tools] if native_tools and plan else None
        calls = plan is not None and plan.choice != "none"
        self._content: Literal["text", "json", "none"] | None = None
        if calls and plan is not None:
            self._content = "none" if plan.choice == "required" else "json" if json_spec else "text"

    def prepare_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        result = rewrite_history(messages, self.fmt) if _has_tool_history(messages) else list(messages)
        notes = []
        if self.plan is not None and not self.fmt.native:
            notes.append(tool_prompt(self.plan, self.fmt))
        if self.json_spec is not None:
            notes.append(self.json_spec.instruction())
        if not notes:
            return result
        note = "\n\n".join(notes)
        if result and result[0]["role"] == "system":
            return [{**result[0], "content": f"{result[0]['content']}\n\n{note}"}, *result[1:]]
        return [{"role": "system", "content": note}, *result]

    def constraint(self) -> Constraint | None:
        if self._grammar is None:
            return None
        return GrammarConstraint(self._grammar, self._n_vocab, self._eos)

    def _parser(self) -> CallParser | None:
        return None if self._content is None else CallParser(self.fmt, self._content)

    def _reason(self, reason: str, called: bool) -> FinishReason:
        if reason == "length":
            return "length"
        if called and self.plan is not None:
            return "function_call" if self.plan.legacy else "tool_calls"
        return "stop"

    def finalize(self, text: str, reason: str) -> tuple[Message, FinishReason]:
        parser = self._parser()
        if parser is None:
            return Message(role="assistant", content=text), self._reason(reason, False)
        content: list[str] = []
        calls: list[list[str]] = []
        for kind, _, value in [*parser.feed(text), *parser.finish()]:
            if kind == "content":
                content.append(value)
            elif kind == "call":
                calls.append([value, ""])
            else:
                calls[-1][1] += value
        message = Message(role="assistant", content="".join(content) or (None if calls else ""))
        if calls and self.plan is not None and self.plan.legacy:
            message.function_call = FunctionCall(name=calls[0][0], arguments=calls[0][1])
        elif calls:
            message.tool_calls = [ToolCall(id=new_call_id(), function=FunctionCall(name=n, arguments=a))
                                  for n, a in calls]
        return message, self._reason(reason, bool(calls))

    def stream_shaper(self) -> StreamShaper:
        return _Shaper(self, self._parser())


class _Shaper:
    def __init__(self, output: StructuredOutput, parser: CallParser | None) -> None:
        self._output = output
        self._parser = parser
        self._legacy = output.plan is not None and output.plan.legacy

    def _deltas(self, events: list[tuple[str, int, str]]) -> list[Delta]:
        deltas: list[Delta] = []
        for kind, index, value in events:
            last = deltas[-1] if deltas else None
            if kind == "content":
                if last is not None and last.content is not None:
                    last.content += value
                else:
                    deltas.append(Delta(content=value))
            elif kind == "call" and self._legacy:
                deltas.append(Delta(function_call=FunctionCallDelta(name=value, arguments="")))
            elif kind == "call":
                deltas.append(Delta(tool_calls=[ToolCallDelta(
                    index=index, id=new_call_id(), type="function",
                    function=FunctionCallDelta(name=value, arguments=""))]))
            elif self._legacy:
                if last is not None and last.function_call is not None and last.function_call.name is None:
                    last.function_call.arguments = (last.function_call.arguments or "") + value
                else:
                    deltas.append(Delta(function_call=FunctionCallDelta(arguments=value)))
            else:
                previous = last.tool_calls[0] if last is not None and last.tool_calls else None
                if previous is not None and previous.id is None and previous.function is not None:
                    previous.function.arguments = (previous.function.arguments or "") + value
                else:
                    deltas.append(Delta(tool_calls=[ToolCallDelta(
                        index=index, function=FunctionCallDelta(arguments=value))]))
        return deltas

    def feed(self, text: str) -> list[Delta]:
        if self._parser is None:
            return [Delta(content=text)] if text else []
        return self._deltas(self._parser.feed(text))

    def finish(self, reason: str) -> tuple[list[Delta], FinishReason]:
        if self._parser is None:
            return [], self._output._reason(reason, False)
        deltas = self._deltas(self._parser.finish())
        return deltas, self._output._reason(reason, bool(self._parser.names))


def _has_tool_history(messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(m.get("tool_calls") or m.get("function_call") or m["role"] in ("tool", "function")
               for m in messages)


# -- selection -----------------------------------------------------------------------------
_formats: dict[tuple[str, str, str], CallFormat] = {}
_formats_lock = threading.Lock()


def call_format(engine: Engine) -> CallFormat:
    """The call format for this model: its template's own when recognisable, else the generic one."""
    template = engine.template
    key = (template.source, template.bos_token, template.eos_token)
    with _formats_lock:
        fmt = _formats.get(key)
    if fmt is None:
        fmt = native_format(template) or GENERIC_FORMAT
        with _formats_lock:
            _formats[key] = fmt
    return fmt


def _single_special(engine: Engine, text: str) -> int | None:
    tokens = engine.backend.tokenize(text)
    if len(tokens) == 1 and engine.backend.llg_tokenizer().is_special_token(tokens[0]):
        return tokens[0]
    return None


def select_output_mode(engine: Engine, request: ChatRequest) -> OutputMode:
    """The output mode for ``request``: validates the structured parameters and compiles the grammar."""
    json_spec = parse_response_format(request.response_format)
    plan = parse_tool_request(request)
    has_history = _has_tool_history(request.messages)
    if json_spec is None and plan is None and not has_history:
        return TextOutput()
    fmt = call_format(engine)
    if request.stop and (json_spec is not None or (plan is not None and plan.choice != "none")):
        raise InvalidRequestError(
            "stop cannot be combined with response_format JSON or tool calls: a stop string could cut "
            "the structure the grammar guarantees", param="stop")
    tokenizer = engine.backend.llg_tokenizer() if json_spec is not None or plan is not None else None
    content_grammar = None
    if json_spec is not None and tokenizer is not None:
        content_grammar = grammar_cache.compile(tokenizer, _json_grammar(json_spec.schema, "response_format"),
                                                param="response_format")
    grammar = content_grammar
    if plan is not None and tokenizer is not None:
        for tool in plan.tools:  # compiled alone first, so an error names the tool
            grammar_cache.compile(tokenizer, _json_grammar(tool.parameters, f"{tool.param}.parameters"),
                                  param=f"{tool.param}.parameters")
        if plan.choice != "none" or json_spec is None:
            syntax = CallSyntax(fmt.open, fmt.close, fmt.separator, fmt.args_key,
                                _single_special(engine, fmt.open), _single_special(engine, fmt.close))
            content: Literal["text", "json", "none", "forbid"] = (
                "forbid" if plan.choice == "none" else "none" if plan.choice == "required"
                else "json" if json_spec is not None else "text")
            lark = tool_call_grammar([(t.name, t.parameters) for t in plan.callable_tools], syntax,
                                     content=content, parallel=plan.parallel,
                                     content_schema=json_spec.schema if json_spec else None)
            grammar = grammar_cache.compile(tokenizer, lark, param="functions" if plan.legacy else "tools")
    return StructuredOutput(engine, fmt=fmt, plan=plan, json_spec=json_spec, grammar=grammar)


def _json_grammar(schema: Mapping[str, Any], param: str) -> str:
    try:
        return json_schema_grammar(schema)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{param} is not a valid JSON Schema: {exc}", param=param) from exc
