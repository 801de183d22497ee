"""Output modes for structured requests: JSON (``response_format``) and tool / function calls.

The request arrives validated: ``request.json_spec`` and ``request.tool_plan`` hold the parsed
``response_format`` and tools (see :mod:`local_llm_kit.request`). :func:`select_output_mode` only
chooses and builds: it decides which parts of each schema the grammar enforces
(:mod:`local_llm_kit.schemas`, following ``strict``), compiles the grammar that guarantees the
reply's shape (an uncompilable schema raises :class:`~local_llm_kit.errors.InvalidRequestError`;
there is never a silent fallback to unconstrained text), checks that ``max_tokens`` can hold the
shortest valid reply, and returns a :class:`StructuredOutput` that shapes what the model wrote into
``message.content`` / ``message.tool_calls`` / ``message.function_call``, whole or as deltas.
Whole replies are built by running the streaming parser over the whole text, so a stream's
concatenated deltas always equal the non-streamed message.

Every finish yields a complete structure: the decode loop steers a reply that is about to run out
of ``max_tokens`` to a completion the grammar accepts (``finish_reason`` is then ``"length"``; see
:meth:`local_llm_kit.constraints.GrammarConstraint.fit`). Keywords a non-strict schema could not
have enforced are checked on the finished output; violations are listed in
``message.schema_violations``.

JSON modes add a short instruction to the system prompt ("respond with JSON", plus the schema
when it is at most :data:`~local_llm_kit.formats.MAX_SCHEMA_PROMPT_CHARS` long); small models
write far better values when they know a JSON reply is expected.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from local_llm_kit.calls import CallFormat, CallParser, format_for, new_call_id
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
from local_llm_kit.formats import MAX_SCHEMA_PROMPT_CHARS, JsonSpec, parse_response_format
from local_llm_kit.output import OutputMode, StreamShaper, TextOutput
from local_llm_kit.request import ChatRequest
from local_llm_kit.schemas import EnforcedSchema, enforce
from local_llm_kit.tools import ToolPlan, rewrite_history, tool_prompt
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

logger = logging.getLogger(__name__)


# -- the output mode -----------------------------------------------------------------------
class StructuredOutput:
    """One request's prompt additions, grammar and result shaping (an ``OutputMode``)."""

    def __init__(self, engine: Engine, *, fmt: CallFormat, plan: ToolPlan | None, json_spec: JsonSpec | None,
                 grammar: CompiledGrammar | None, content_check: EnforcedSchema | None = None,
                 call_checks: Mapping[str, EnforcedSchema] | None = None, repetition_guard: int = 0) -> None:
        self.fmt = fmt
        self._repetition_guard = repetition_guard
        self.plan = plan
        self.json_spec = json_spec
        self._grammar = grammar
        self._content_check = content_check
        self._call_checks = dict(call_checks or {})
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
        return GrammarConstraint(self._grammar, self._n_vocab, self._eos, repetition_guard=self._repetition_guard)

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
            return (Message(role="assistant", content=text, schema_violations=self.violations(text, []) or None),
                    self._reason(reason, False))
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
        message.schema_violations = self.violations("".join(content), [(n, a) for n, a in calls]) or None
        return message, self._reason(reason, bool(calls))

    def violations(self, content: str, calls: Sequence[tuple[str, str]]) -> list[str]:
        """What the finished reply breaks of keywords the grammar did not enforce (non-strict schemas)."""
        found: list[str] = []
        if self._content_check is not None and content and not calls:
            found += [f"content{v}" for v in self._content_check.violations(content)]
        for i, (name, arguments) in enumerate(calls):
            check = self._call_checks.get(name)
            if check is not None:
                where = "function_call" if self.plan is not None and self.plan.legacy else f"tool_calls[{i}]"
                found += [f"{where} ({name}) arguments{v}" for v in check.violations(arguments)]
        if found:
            logger.warning("the reply breaks schema keywords that were not enforced: %s", "; ".join(found))
        return found

    def stream_shaper(self) -> StreamShaper:
        return _Shaper(self, self._parser())


class _Shaper:
    def __init__(self, output: StructuredOutput, parser: CallParser | None) -> None:
        self._output = output
        self._parser = parser
        self._legacy = output.plan is not None and output.plan.legacy
        self._content: list[str] = []
        self._calls: list[list[str]] = []

    def _record(self, events: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
        for kind, _, value in events:
            if kind == "content":
                self._content.append(value)
            elif kind == "call":
                self._calls.append([value, ""])
            else:
                self._calls[-1][1] += value
        return events

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
            self._content.append(text)
            return [Delta(content=text)] if text else []
        return self._deltas(self._record(self._parser.feed(text)))

    def finish(self, reason: str) -> tuple[list[Delta], FinishReason]:
        deltas = [] if self._parser is None else self._deltas(self._record(self._parser.finish()))
        called = self._parser is not None and bool(self._parser.names)
        violations = self._output.violations("".join(self._content), [(n, a) for n, a in self._calls])
        if violations:  # known only once the reply is whole: sent on a delta of its own
            deltas.append(Delta(schema_violations=violations))
        return deltas, self._output._reason(reason, called)


_CALL_KEYS = frozenset({"tool_calls", "function_call"})
_RESULT_ROLES = frozenset({"tool", "function"})
_role = operator.itemgetter("role")


def _has_tool_history(messages: Sequence[Mapping[str, Any]]) -> bool:
    # Asked twice a request of the whole history: answered in C-level walks for the common
    # history without calls, and message by message only where a call key is present.
    if _RESULT_ROLES.isdisjoint(map(_role, messages)) and all(map(_CALL_KEYS.isdisjoint, messages)):
        return False
    return any(m.get("tool_calls") or m.get("function_call") or m["role"] in _RESULT_ROLES for m in messages)


# -- selection -----------------------------------------------------------------------------
def call_format(engine: Engine) -> CallFormat:
    """The call format for this model: its template's own when recognisable, else the generic one."""
    return format_for(engine.template)


def _single_special(engine: Engine, text: str) -> int | None:
    tokens = engine.backend.tokenize(text)
    if len(tokens) == 1 and engine.backend.llg_tokenizer().is_special_token(tokens[0]):
        return tokens[0]
    return None


def select_output_mode(engine: Engine, request: ChatRequest) -> OutputMode:
    """The output mode for ``request``: decides what each schema enforces and compiles the grammar."""
    json_spec, plan = request.json_spec, request.tool_plan
    if request.repetition_guard and json_spec is None and (plan is None or plan.choice == "none"):
        raise InvalidRequestError("repetition_guard applies to constrained output (a JSON response_format, or "
                                  "tools the model may call); this request has none", param="repetition_guard")
    has_history = _has_tool_history(request.messages)
    if json_spec is None and plan is None and not has_history:
        return TextOutput()
    fmt = call_format(engine)
    if json_spec is None and plan is None:
        return StructuredOutput(engine, fmt=fmt, plan=None, json_spec=None, grammar=None)
    tokenizer = engine.backend.llg_tokenizer()

    def compile_error(schema: Any) -> str | None:
        try:
            return grammar_cache.error(tokenizer, json_schema_grammar(schema))
        except (TypeError, ValueError) as exc:
            return f"not a valid JSON Schema: {exc}"

    content_check = grammar = None
    if json_spec is not None:
        content_check = enforce(json_spec.schema, strict=json_spec.strict, compile_error=compile_error,
                                param="response_format")
        grammar = grammar_cache.compile(tokenizer, json_schema_grammar(content_check.grammar_schema),
                                        param="response_format")
    call_checks: dict[str, EnforcedSchema] = {}
    if plan is not None:
        for tool in plan.tools:  # each alone first, so an error names the tool
            param = f"{tool.param}.parameters"
            call_checks[tool.name] = enforce(tool.parameters, strict=bool(tool.strict), compile_error=compile_error,
                                             param=param)
        if plan.choice != "none" or json_spec is None:
            syntax = CallSyntax(fmt.open, fmt.close, fmt.separator, fmt.args_key,
                                _single_special(engine, fmt.open), _single_special(engine, fmt.close))
            content: Literal["text", "json", "none", "forbid"] = (
                "forbid" if plan.choice == "none" else "none" if plan.choice == "required"
                else "json" if json_spec is not None else "text")
            lark = tool_call_grammar(
                [(t.name, call_checks[t.name].grammar_schema) for t in plan.callable_tools], syntax,
                content=content, parallel=plan.max_calls > 1, max_calls=plan.max_calls,
                content_schema=content_check.grammar_schema if content_check is not None else None)
            grammar = grammar_cache.compile(tokenizer, lark, param="functions" if plan.legacy else "tools")
            tools = plan.callable_tools
            if content != "forbid" and (plan.max_calls > 1 or len(tools) > 1):
                # The shortest reply is one call of one tool (the grammar may end after any call):
                # each single call is searched alone, so the budget check and the closing use the
                # shortest of them, not the first the greedy search meets.
                grammar.add_narrower([grammar_cache.compile(
                    tokenizer, tool_call_grammar([(t.name, call_checks[t.name].grammar_schema)], syntax,
                                                 content="none", parallel=False), param=f"{t.param}.parameters")
                    for t in tools])
    if grammar is not None and request.max_tokens is not None:
        _check_budget(engine, grammar, request.max_tokens)
    return StructuredOutput(engine, fmt=fmt, plan=plan, json_spec=json_spec, grammar=grammar,
                            content_check=content_check, call_checks=call_checks,
                            repetition_guard=request.repetition_guard)


def _check_budget(engine: Engine, grammar: CompiledGrammar, max_tokens: int) -> None:
    """A ``max_tokens`` too small for any reply the grammar accepts is an error, not a cut reply."""
    info = engine.backend.info
    minimum = grammar.min_tokens(info.n_vocab, info.eos_token_ids)
    if minimum is not None and max_tokens < minimum:
        raise InvalidRequestError(
            f"max_tokens={max_tokens} cannot hold a complete reply in the requested format: the shortest "
            f"valid one takes {minimum} tokens with this model; raise max_tokens", param="max_tokens")
