"""Validation of ``chat.completions.create`` arguments into one typed :class:`ChatRequest`.

Every parameter OpenAI's API accepts is either carried into the request or rejected here with
an :class:`~local_llm_kit.errors.InvalidRequestError` that names it: nothing is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from local_llm_kit.closing import repetition_guard
from local_llm_kit.config import check_sampling
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.formats import JsonSpec, parse_response_format
from local_llm_kit.speculation import draft_tokens
from local_llm_kit.tools import ToolPlan, parse_tools

__all__ = ["ChatRequest", "check_tool_results", "normalize_messages", "validate_request"]

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    # schema_violations: our own report on a reply (see schemas.py), so a reply can be sent back as is.
    "assistant": {"role", "content", "name", "tool_calls", "function_call", "refusal", "annotations", "audio",
                  "schema_violations"},
    "tool": {"role", "content", "tool_call_id", "name"},
    "function": {"role", "content", "name"},
}
MAX_STOP_STRINGS = 4
MAX_N = 16


@dataclass(frozen=True)
class ChatRequest:
    """A validated request: every field has its final type and range."""

    messages: tuple[dict[str, Any], ...]
    model: str | None
    temperature: float
    top_p: float
    max_tokens: int | None
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    seed: int | None
    n: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[int, float]
    logprobs: bool
    top_logprobs: int | None
    user: str | None
    response_format: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: tuple[dict[str, Any], ...] | None = None
    function_call: str | dict[str, Any] | None = None
    json_spec: JsonSpec | None = None
    """``response_format`` parsed: None for free text."""
    tool_plan: ToolPlan | None = None
    """``tools``/``functions`` and their choice parameters parsed: None without tools."""
    repetition_guard: int = 0
    """Repeats of one token sequence after which structured output is closed early (0: off)."""
    draft_tokens: int | None = None
    """``prompt_lookup`` as the longest draft per forward pass (0: off); None: the client's setting."""

    @classmethod
    def for_counting(cls, messages: Sequence[dict[str, Any]],
                     tools: Sequence[dict[str, Any]] | None = None, *,
                     tool_choice: str | dict[str, Any] | None = None, parallel_tool_calls: bool | None = None,
                     response_format: dict[str, Any] | None = None,
                     functions: Sequence[dict[str, Any]] | None = None,
                     function_call: str | dict[str, Any] | None = None) -> ChatRequest:
        """A request that only renders ``messages`` and what changes the prompt: for exact token counts."""
        structured = _structured({"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls":
                                  parallel_tool_calls, "response_format": response_format,
                                  "functions": functions, "function_call": function_call}, stop=())
        return cls(messages=tuple(messages), model=None, temperature=0.0, top_p=1.0, max_tokens=None,
                   stream=False, include_usage=False, stop=(), seed=None, n=1, presence_penalty=0.0,
                   frequency_penalty=0.0, logit_bias={}, logprobs=False, top_logprobs=None, user=None,
                   **structured)


def _as_dict(item: Any, where: str) -> dict[str, Any]:
    if isinstance(item, type):
        hint = ("for a pydantic class, call chat.completions.parse(response_format=YourModel), as with openai's "
                "client" if where == "response_format" else "pass an instance")
        raise InvalidRequestError(f"{where} must be a dict, got the class {item.__name__}; {hint}", param=where)
    if hasattr(item, "model_dump"):  # pydantic models (ours, openai's)
        item = item.model_dump(exclude_none=True)
    if not isinstance(item, Mapping):
        raise InvalidRequestError(f"{where} must be a dict, got {type(item).__name__}", param=where)
    return dict(item)


def _text(value: str, where: str) -> str:
    """``value``, once it is known to be text the tokenizer can encode: a lone UTF-16 surrogate
    (an emoji cut in half by a client that counts UTF-16 units) cannot be, and would fail deep in
    the backend instead of naming the field."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidRequestError(
                f"{where} is not valid Unicode text: it holds a lone surrogate "
                f"{value[error.start:error.end]!r} at character {error.start} (half of a UTF-16 pair, as a "
                "string cut inside an emoji has); send whole characters", param=where) from None
    return value


def _check_texts(value: Any, where: str) -> None:
    """Every string in a JSON-like value (tools, schemas) is encodable text (see :func:`_text`)."""
    if isinstance(value, str):
        _text(value, where)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_texts(key, where)
            _check_texts(item, f"{where}.{key}")
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        for i, item in enumerate(value):
            _check_texts(item, f"{where}[{i}]")


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return _text(content, where)
    if isinstance(content, Sequence):
        texts = []
        for i, part in enumerate(content):
            part = _as_dict(part, f"{where}[{i}]")
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"{where}[{i}] has type {part.get('type')!r}; only text parts are supported "
                    "by local models", param=f"{where}[{i}].type")
            texts.append(_text(part["text"], f"{where}[{i}].text"))
        return "".join(texts)
    raise InvalidRequestError(f"{where} must be a string or a list of text parts", param=where)


def _normalize_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise InvalidRequestError(f"{where} must be a list", param=where)
    normalized = []
    for i, raw in enumerate(calls):
        call = _as_dict(raw, f"{where}[{i}]")
        function = _as_dict(call.get("function"), f"{where}[{i}].function")
        if not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
            raise InvalidRequestError(
                f"{where}[{i}].function needs string 'name' and 'arguments'", param=f"{where}[{i}].function")
        normalized.append({"id": _text(str(call.get("id", f"call_{i}")), f"{where}[{i}].id"), "type": "function",
                           "function": {"name": _text(function["name"], f"{where}[{i}].function.name"),
                                        "arguments": _text(function["arguments"],
                                                           f"{where}[{i}].function.arguments")}})
    return normalized


def _assistant_content(message: Mapping[str, Any], content: Any, where: str) -> Any:
    """An assistant message's text as the model said it: a ``refusal`` is what it said.

    ``annotations`` (citations of a web search) and ``audio`` (a spoken reply) are outputs of
    OpenAI's service that a local model can neither produce nor read: ``None`` or empty is
    accepted (replayed responses carry them), anything else raises rather than being dropped.
    """
    for key in ("annotations", "audio"):
        if message.get(key):
            raise InvalidRequestError(
                f"{where}.{key} is not supported by local models; remove it from the message", param=f"{where}.{key}")
    refusal = message.get("refusal")
    if refusal is None:
        return content
    if not isinstance(refusal, str):
        raise InvalidRequestError(f"{where}.refusal must be a string", param=f"{where}.refusal")
    if content:
        raise InvalidRequestError(f"{where} has both content and refusal; an assistant reply is one or the other",
                                  param=f"{where}.refusal")
    return refusal


def normalize_messages(messages: Any, param: str = "messages") -> list[dict[str, Any]]:
    """Validate messages; return plain dicts with string content and ``developer`` as ``system``."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError(f"{param} must be a list of message dicts", param=param)
    result = []
    for i, raw in enumerate(messages):
        where = f"{param}[{i}]"
        message = _as_dict(raw, where)
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"{where}.role must be one of {list(ROLES)}, got {role!r}",
                                      param=f"{where}.role")
        unknown = set(message) - _MESSAGE_KEYS[role]
        if unknown:
            raise InvalidRequestError(f"{where} has unsupported keys {sorted(unknown)} for role {role!r}",
                                      param=f"{where}.{sorted(unknown)[0]}")
        out: dict[str, Any] = {"role": "system" if role == "developer" else role}
        content = message.get("content")
        if role == "assistant":
            content = _assistant_content(message, content, where)
        has_call = bool(message.get("tool_calls") or message.get("function_call"))
        if content is None and not (role == "assistant" and has_call):
            raise InvalidRequestError(f"{where}.content is required", param=f"{where}.content")
        out["content"] = _content_text(content, f"{where}.content") if content is not None else None
        if "name" in message:
            if not isinstance(message["name"], str):
                raise InvalidRequestError(f"{where}.name must be a string", param=f"{where}.name")
            out["name"] = _text(message["name"], f"{where}.name")
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise InvalidRequestError(f"{where}.tool_call_id is required for tool messages",
                                          param=f"{where}.tool_call_id")
            out["tool_call_id"] = _text(message["tool_call_id"], f"{where}.tool_call_id")
        if role == "function" and "name" not in out:
            raise InvalidRequestError(f"{where}.name is required for function messages", param=f"{where}.name")
        if message.get("tool_calls"):
            out["tool_calls"] = _normalize_tool_calls(message["tool_calls"], f"{where}.tool_calls")
        if message.get("function_call"):
            call = _normalize_tool_calls([{"function": message["function_call"]}], f"{where}.function_call")
            out["function_call"] = call[0]["function"]
        result.append(out)
    return result


def check_tool_results(messages: Sequence[dict[str, Any]], history: Sequence[dict[str, Any]] = ()) -> None:
    """Each ``tool`` message must answer a call of the assistant message before it (other results
    may come between), as OpenAI requires (a 400 there): a result with no call, or naming a call
    that was not made, would be rendered as the answer to nothing. ``history`` is what memory sends
    first, so a result may answer the call that ended the remembered conversation."""
    open_calls: set[str] | None = None
    last = next((m for m in reversed(history) if m["role"] != "tool"), None)  # results keep what is open
    if last is not None:
        open_calls = _calls_answerable_after(last, None)
    for i, message in enumerate(messages):
        if message["role"] == "tool":
            where = f"messages[{i}]"
            if open_calls is None:
                raise InvalidRequestError(
                    f"{where} is a 'tool' message, which must answer the tool_calls of an assistant message "
                    "before it, and there is none: send the assistant message with its tool_calls first",
                    param=f"{where}.role")
            if message["tool_call_id"] not in open_calls:
                raise InvalidRequestError(
                    f"{where}.tool_call_id {message['tool_call_id']!r} is not among the tool_calls of the "
                    f"assistant message before it: {sorted(open_calls)}", param=f"{where}.tool_call_id")
        open_calls = _calls_answerable_after(message, open_calls)


def _calls_answerable_after(message: dict[str, Any], open_calls: set[str] | None) -> set[str] | None:
    if message["role"] == "tool":
        return open_calls
    if message["role"] == "assistant" and message.get("tool_calls"):
        return {call["id"] for call in message["tool_calls"]}
    return None


def _optional_int(name: str, value: Any, low: int, high: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", param=name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidRequestError(f"{name} must be {bound}, got {value}", param=name)
    return value


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequestError("stop must be a non-empty string or a list of them", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"stop takes at most {MAX_STOP_STRINGS} strings", param="stop")
    return tuple(_text(s, "stop") for s in stop)


def _logit_bias(bias: Any, n_vocab: int) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, Mapping):
        raise InvalidRequestError("logit_bias must map token ids to biases", param="logit_bias")
    result = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token < n_vocab:
            raise InvalidRequestError(f"logit_bias token {token} is outside the vocabulary (0..{n_vocab - 1})",
                                      param="logit_bias")
        result[token] = check_sampling("logit_bias", value, -100.0, 100.0)
    return result


def _tuple_of_dicts(value: Any, name: str) -> tuple[dict[str, Any], ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise InvalidRequestError(f"{name} must be a non-empty list", param=name)
    return tuple(_as_dict(v, f"{name}[{i}]") for i, v in enumerate(value))


def _structured(args: Mapping[str, Any], stop: tuple[str, ...]) -> dict[str, Any]:
    """The ChatRequest fields of structured output: raw values (forwarded as given) and parsed ones."""
    parallel = args.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequestError("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    response_format = (None if args.get("response_format") is None
                       else _as_dict(args["response_format"], "response_format"))
    tools = _tuple_of_dicts(args.get("tools"), "tools")
    functions = _tuple_of_dicts(args.get("functions"), "functions")
    for name, value in (("tools", tools), ("functions", functions), ("response_format", response_format),
                        ("tool_choice", args.get("tool_choice")), ("function_call", args.get("function_call"))):
        _check_texts(value, name)
    json_spec = parse_response_format(response_format)
    plan = parse_tools(tools, args.get("tool_choice"), parallel, functions, args.get("function_call"))
    if stop and (json_spec is not None or (plan is not None and plan.choice != "none")):
        raise InvalidRequestError(
            "stop cannot be combined with response_format JSON or tool calls: a stop string could cut "
            "the structure the grammar guarantees", param="stop")
    return {"response_format": response_format, "tools": tools, "tool_choice": args.get("tool_choice"),
            "parallel_tool_calls": parallel, "functions": functions, "function_call": args.get("function_call"),
            "json_spec": json_spec, "tool_plan": plan}


def validate_request(args: dict[str, Any], *, default_temperature: float, default_top_p: float,
                     n_vocab: int) -> ChatRequest:
    """Turn ``create()``'s keyword arguments into a :class:`ChatRequest` or raise."""
    messages = normalize_messages(args["messages"])
    if not messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")

    max_tokens = _optional_int("max_tokens", args.get("max_tokens"), 1)
    max_completion = _optional_int("max_completion_tokens", args.get("max_completion_tokens"), 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise InvalidRequestError("max_tokens and max_completion_tokens disagree; pass one",
                                  param="max_completion_tokens")
    stream = args.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream must be a boolean", param="stream")
    stream_options = args.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise InvalidRequestError("stream_options is only allowed with stream=True", param="stream_options")
        options = _as_dict(stream_options, "stream_options")
        unknown = set(options) - {"include_usage"}
        if unknown:
            raise InvalidRequestError(f"stream_options has unsupported keys {sorted(unknown)}",
                                      param="stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise InvalidRequestError("stream_options.include_usage must be a boolean",
                                      param="stream_options.include_usage")

    logprobs = args.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise InvalidRequestError("logprobs must be a boolean", param="logprobs")
    top_logprobs = _optional_int("top_logprobs", args.get("top_logprobs"), 0, 20)
    if top_logprobs is not None and not logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs=True", param="top_logprobs")
    user = args.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequestError("user must be a string", param="user")
    temperature = args.get("temperature")
    top_p = args.get("top_p")
    penalty = {name: check_sampling(name, args.get(name) or 0.0, -2.0, 2.0)
               for name in ("presence_penalty", "frequency_penalty")}
    model = args.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError("model must be a string", param="model")
    stop = _stop(args.get("stop"))
    return ChatRequest(
        messages=tuple(messages),
        model=model,
        temperature=(default_temperature if temperature is None
                     else check_sampling("temperature", temperature, 0.0, 2.0)),
        top_p=default_top_p if top_p is None else check_sampling("top_p", top_p, 0.0, 1.0),
        max_tokens=max_tokens if max_tokens is not None else max_completion,
        stream=stream,
        include_usage=include_usage,
        stop=stop,
        seed=_optional_int("seed", args.get("seed"), -(2**63), 2**63 - 1),
        n=_optional_int("n", args.get("n"), 1, MAX_N) or 1,
        presence_penalty=penalty["presence_penalty"],
        frequency_penalty=penalty["frequency_penalty"],
        logit_bias=_logit_bias(args.get("logit_bias"), n_vocab),
        logprobs=logprobs,
        top_logprobs=top_logprobs if top_logprobs is not None else (0 if logprobs else None),
        user=user,
        repetition_guard=repetition_guard(args.get("repetition_guard")),
        draft_tokens=None if args.get("prompt_lookup") is None else draft_tokens(args["prompt_lookup"]),
        **_structured(args, stop),
    )
