"""Tool calling, legacy functions and JSON response formats end to end on the fake backend."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai.types.chat as oai
import pytest

from local_llm_kit.calls import GENERIC_FORMAT, CallFormat, CallParser, native_format
from local_llm_kit.chat import encode_request
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.request import validate_request
from local_llm_kit.templates import ChatTemplate
from local_llm_kit.testing import FakeBackend, fake_client
from local_llm_kit.tools import rewrite_history

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
           "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}},
]
FUNCTIONS = [t["function"] for t in TOOLS]
Q = [{"role": "user", "content": "Weather in Paris?"}]


def call(name: str, arguments: dict[str, Any]) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {json.dumps(arguments)}}}</tool_call>'


PARIS = call("get_weather", {"city": "Paris"})
TOKYO = call("get_time", {"tz": "Asia/Tokyo"})


def create(reply: Any, **kwargs: Any) -> Any:
    client = fake_client(reply=reply, temperature=0)
    return client.chat.completions.create(messages=kwargs.pop("messages", Q), **kwargs)


def stream(reply: Any, **kwargs: Any) -> list[Any]:
    return list(create(reply, stream=True, **kwargs))


def rebuild(chunks: list[Any]) -> dict[str, Any]:
    """The message a client assembles from stream deltas, as OpenAI's SDK does."""
    content, calls, function_call, reason = "", {}, None, None
    for chunk in chunks:
        oai.ChatCompletionChunk.model_validate_json(chunk.model_dump_json())
        choice = chunk.choices[0]
        reason = choice.finish_reason or reason
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = delta.id or entry["id"]
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        if choice.delta.function_call is not None:
            function_call = function_call or {"name": "", "arguments": ""}
            function_call["name"] += choice.delta.function_call.name or ""
            function_call["arguments"] += choice.delta.function_call.arguments or ""
    return {"content": content, "calls": [calls[i] for i in sorted(calls)], "function_call": function_call,
            "finish_reason": reason}


def summary(response: Any) -> dict[str, Any]:
    oai.ChatCompletion.model_validate_json(response.model_dump_json())
    message = response.choices[0].message
    return {"content": message.content or "",
            "calls": [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                      for c in message.tool_calls or []],
            "function_call": message.function_call and message.function_call.model_dump(),
            "finish_reason": response.choices[0].finish_reason}


def same_modulo_ids(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def strip(x: dict[str, Any]) -> dict[str, Any]:
        return {**x, "calls": [{k: v for k, v in c.items() if k != "id"} for c in x["calls"]]}

    return strip(a) == strip(b)


# -- results -------------------------------------------------------------------------------
@pytest.mark.parametrize(("reply", "kwargs", "content", "names", "reason"), [
    ("It is sunny.", {"tools": TOOLS}, "It is sunny.", [], "stop"),
    (PARIS, {"tools": TOOLS}, "", ["get_weather"], "tool_calls"),
    ("Let me look.\n" + PARIS, {"tools": TOOLS}, "Let me look.", ["get_weather"], "tool_calls"),
    (PARIS + TOKYO, {"tools": TOOLS}, "", ["get_weather", "get_time"], "tool_calls"),
    (PARIS + TOKYO, {"tools": TOOLS, "parallel_tool_calls": False}, "", ["get_weather"], "tool_calls"),
    (PARIS, {"tools": TOOLS, "tool_choice": "required"}, "", ["get_weather"], "tool_calls"),
    (TOKYO, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "", ["get_time"], "tool_calls"),
    ("Sure: " + PARIS, {"tools": TOOLS, "tool_choice": "none"}, None, [], "stop"),
])
def test_tool_results_and_streams_agree(reply: str, kwargs: dict[str, Any], content: str | None,
                                        names: list[str], reason: str) -> None:
    whole = summary(create(reply, max_tokens=200, **kwargs))
    assert [c["name"] for c in whole["calls"]] == names
    assert whole["finish_reason"] == reason
    if content is not None:
        assert whole["content"] == content
    assert "<tool_call>" not in whole["content"]
    for c in whole["calls"]:
        assert c["id"].startswith("call_")
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == c["name"])
        jsonschema.validate(json.loads(c["arguments"]), schema)
    streamed = rebuild(stream(reply, max_tokens=200, **kwargs))
    assert same_modulo_ids(streamed, whole)


def test_message_shape_when_calling() -> None:
    message = create(PARIS, tools=TOOLS).choices[0].message
    assert message.content is None and message.function_call is None
    assert message.tool_calls[0].type == "function"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_first_tool_call_delta_is_shaped_like_openais() -> None:
    deltas = [c.choices[0].delta for c in stream(PARIS + TOKYO, tools=TOOLS) if c.choices[0].delta.tool_calls]
    starts = [d.tool_calls[0] for d in deltas if d.tool_calls[0].id is not None]
    assert [(s.index, s.type, s.function.name, s.function.arguments) for s in starts] == [
        (0, "function", "get_weather", ""), (1, "function", "get_time", "")]
    for d in deltas:
        part = d.tool_calls[0]
        if part.id is None:
            assert part.type is None and part.function.name is None and part.function.arguments


def test_legacy_functions() -> None:
    named = {"functions": FUNCTIONS, "function_call": {"name": "get_weather"}}
    for kwargs in ({"functions": FUNCTIONS}, named):
        whole = summary(create(PARIS, **kwargs))
        assert whole["function_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        assert whole["finish_reason"] == "function_call" and whole["calls"] == []
        streamed = rebuild(stream(PARIS, **kwargs))
        assert streamed["function_call"] == whole["function_call"]
        assert streamed["finish_reason"] == "function_call"
    assert summary(create("No call.", functions=FUNCTIONS, function_call="none"))["content"] == "No call."


def test_a_call_cut_by_max_tokens_is_completed_and_reports_length() -> None:
    whole = summary(create(PARIS, tools=TOOLS, tool_choice="required", max_tokens=74))
    assert whole["finish_reason"] == "length"
    assert whole["calls"][0]["name"] == "get_weather"
    arguments = json.loads(whole["calls"][0]["arguments"])  # complete, though the model was cut
    jsonschema.validate(arguments, WEATHER)
    assert "Paris".startswith(arguments["city"])
    assert same_modulo_ids(rebuild(stream(PARIS, tools=TOOLS, tool_choice="required", max_tokens=74)), whole)


def test_several_choices() -> None:
    response = create(PARIS, tools=TOOLS, n=2)
    assert [c.finish_reason for c in response.choices] == ["tool_calls", "tool_calls"]


# -- JSON response formats -----------------------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"}},
          "required": ["name", "ok"]}


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_object", "schema": PERSON},
    {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True,
                                            "description": "a person"}},
])
def test_json_formats(response_format: dict[str, Any]) -> None:
    reply = '{"name": "Bo", "ok": true}'
    whole = create(reply, response_format=response_format)
    assert whole.choices[0].message.content == reply and whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].message.content), response_format.get("schema", PERSON))
    chunks = stream(reply, response_format=response_format)
    assert rebuild(chunks)["content"] == reply


def test_json_prompt_mentions_the_schema() -> None:
    prompts: list[str] = []
    create(lambda p: prompts.append(p) or "{}", response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert "Respond only with JSON (person)" in prompts[0] and '"required":["name","ok"]' in prompts[0]


def test_json_or_tool_call_when_both_are_given() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    assert summary(create('{"name": "Bo", "ok": true}', tools=TOOLS, response_format=fmt))["content"] == (
        '{"name": "Bo", "ok": true}')
    assert summary(create(PARIS, tools=TOOLS, response_format=fmt))["calls"][0]["name"] == "get_weather"
    assert rebuild(stream(PARIS, tools=TOOLS, response_format=fmt))["calls"][0]["name"] == "get_weather"


# -- validation ----------------------------------------------------------------------------
def tool(**function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", **function}}


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"tools": [TOOLS[0], tool(name="bad name")]}, "tools[1].function.name"),
    ({"tools": [TOOLS[0], {"type": "function", "function": {}}]}, "tools[1].function.name"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f"}, "extra": 1}]}, "tools[0].extra"),
    ({"tools": [tool(bogus=1)]}, "tools[0].function.bogus"),
    ({"tools": [tool(description=3)]}, "tools[0].function.description"),
    ({"tools": [tool(parameters={"type": "string"})]}, "tools[0].function.parameters"),
    ({"tools": [tool(strict=True, parameters={"type": "object", "properties": {"d": {"format": "nope"}}})]},
     "tools[0].function.parameters"),
    ({"tools": [tool(parameters={"type": "object", "properties": {"d": {"pattern": "(?=x)"}}})]},
     "tools[0].function.parameters"),
    ({"tools": [tool(strict="yes")]}, "tools[0].function.strict"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools"}}, "tool_choice.type"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"tools": TOOLS, "functions": FUNCTIONS}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"functions": FUNCTIONS, "function_call": {"name": "nope"}}, "function_call"),
    ({"functions": FUNCTIONS, "function_call": "required"}, "function_call"),
    ({"functions": [{"name": "f", "strict": True}]}, "functions[0].strict"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "text", "schema": {}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "x": 1}}},
     "response_format"),
    ({"response_format": {"type": "json_object", "schema": "object"}}, "response_format"),
    ({"response_format": {"type": "json_object", "schema": {"type": "string", "pattern": "(?=x)"}}},
     "response_format"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
    ({"tools": TOOLS, "stop": ["\n"]}, "stop"),
])
def test_invalid_requests_name_the_parameter(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        create("x", **kwargs)
    assert info.value.param == param


def test_uncompilable_schema_says_why() -> None:
    with pytest.raises(InvalidRequestError, match="format"):
        create("x", response_format={"type": "json_schema", "json_schema": {
            "name": "s", "strict": True, "schema": {"type": "string", "format": "nope"}}})


def test_stop_is_allowed_when_no_structure_is_generated() -> None:
    assert create("one, two", tools=TOOLS, tool_choice="none", stop=[","]).choices[0].message.content == "one"


# -- prompts and history -------------------------------------------------------------------
HISTORY = [
    {"role": "user", "content": "Weather in Paris and time in Tokyo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_time", "arguments": '{"tz": "Asia/Tokyo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "09:00"},
]


def prompt_of(backend: FakeBackend | None = None, **kwargs: Any) -> str:
    """The exact prompt text the model is fed for a request."""
    engine = fake_client(backend=backend or FakeBackend(), temperature=0).engine
    request = validate_request({"messages": kwargs.pop("messages"), **kwargs}, default_temperature=0.0,
                               default_top_p=1.0, n_vocab=engine.backend.info.n_vocab)
    _, prompt = encode_request(engine, request)
    return b"".join(engine.backend.token_bytes(t) for t in prompt).decode()


def test_generic_prompt_and_history() -> None:
    prompt = prompt_of(messages=HISTORY, tools=TOOLS)
    assert prompt.startswith("<|im_start|>system\n# Tools")
    assert json.dumps(TOOLS[0]) in prompt
    assert f"<|im_start|>assistant\n{PARIS}{TOKYO}<|im_end|>" in prompt  # arguments re-laid out
    assert ('<|im_start|>user\n<tool_response name="get_weather">\nsunny\n</tool_response>\n'
            '<tool_response name="get_time">\n09:00\n</tool_response><|im_end|>') in prompt


def test_tool_prompt_follows_the_choice() -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    assert "Call get_time now." in prompt_of(messages=Q, tools=TOOLS, tool_choice=named)
    assert "at most one call" in prompt_of(messages=Q, tools=TOOLS, parallel_tool_calls=False)
    assert "Do not call" in prompt_of(messages=Q, tools=TOOLS, tool_choice="none")


def test_history_without_tools_still_renders() -> None:
    prompt = prompt_of(messages=[*HISTORY, {"role": "user", "content": "Thanks!"}])
    assert "# Tools" not in prompt
    assert "09:00\n</tool_response>\n\nThanks!<|im_end|>" in prompt  # one user turn


def test_legacy_function_history() -> None:
    history = [Q[0], {"role": "assistant", "content": None,
                      "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
               {"role": "function", "name": "get_weather", "content": "sunny"}]
    prompt = prompt_of(messages=history, functions=FUNCTIONS)
    assert PARIS in prompt and '<tool_response name="get_weather">\nsunny' in prompt


def test_gemma_fallback_template_gets_tool_results_as_user_turns() -> None:
    backend = FakeBackend(chat_template=None, architecture="gemma3")
    prompt = prompt_of(backend, messages=HISTORY, tools=TOOLS)
    assert prompt.count("<start_of_turn>user") == 2 and f"<start_of_turn>model\n{PARIS}{TOKYO}" in prompt


QWEN_STYLE = """{%- if tools %}<|im_start|>system
# Tools

<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each call, return a json object with function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role in ("user", "system") or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{{- tool_call.arguments | tojson }}
{{- '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == "tool" %}
{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""


def test_native_format_is_read_off_the_template() -> None:
    fmt = native_format(ChatTemplate(QWEN_STYLE))
    assert fmt == CallFormat("<tool_call>\n", "\n</tool_call>", "\n", "arguments", native=True)
    assert native_format(ChatTemplate("{{ messages }}{{ tools }}")) is None
    assert native_format(ChatTemplate(FakeBackend().info.chat_template or "")) is None


SINGLE_CALL = QWEN_STYLE.replace(
    "{%- for tool_call in message.tool_calls %}",
    "{%- if message.tool_calls | length > 1 %}{{ raise_exception('one call at a time') }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}")
NO_MARKER = QWEN_STYLE.replace("'\n<tool_call>\n{", "'\n{").replace("'}\n</tool_call>'", "'}'")


def test_native_formats_that_need_care() -> None:
    single = native_format(ChatTemplate(SINGLE_CALL))
    assert single is not None and single.separator is None
    assert native_format(ChatTemplate(NO_MARKER)) is None  # text and calls would be indistinguishable
    native = PARIS.replace("<tool_call>", "<tool_call>\n").replace("</tool_call>", "\n</tool_call>")
    backend = FakeBackend(native + "\n" + native, chat_template=SINGLE_CALL)
    response = fake_client(backend=backend, temperature=0).chat.completions.create(messages=Q, tools=TOOLS)
    assert len(response.choices[0].message.tool_calls) == 1


def test_native_format_end_to_end() -> None:
    native = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    backend = FakeBackend(native, chat_template=QWEN_STYLE)
    client = fake_client(backend=backend, temperature=0)
    whole = summary(client.chat.completions.create(messages=Q, tools=TOOLS))
    assert whole["calls"][0]["name"] == "get_weather" and whole["finish_reason"] == "tool_calls"
    prompt = prompt_of(FakeBackend(chat_template=QWEN_STYLE), messages=HISTORY, tools=TOOLS)
    assert json.dumps(TOOLS[1]) in prompt and "# Tools\n\nYou can call" not in prompt  # the template's own
    assert '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


def test_rewrite_keeps_plain_messages() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "ann"}]
    assert rewrite_history(messages, GENERIC_FORMAT) == messages


# -- the parser ----------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "Plain text with <tool and < signs",
    "Text then \n\n" + PARIS + TOKYO,
    call("get_weather", {"city": 'Pa"ris}{', "unit": "c"}),
])
def test_parser_gives_the_same_events_whole_or_byte_by_byte(text: str) -> None:
    def merged(events: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
        out: list[tuple[str, int, str]] = []
        for kind, index, value in events:
            if out and kind != "call" and out[-1][:2] == (kind, index):
                out[-1] = (kind, index, out[-1][2] + value)
            else:
                out.append((kind, index, value))
        return out

    whole = CallParser(GENERIC_FORMAT)
    by_byte = CallParser(GENERIC_FORMAT)
    one = whole.feed(text) + whole.finish()
    many = [e for ch in text for e in by_byte.feed(ch)] + by_byte.finish()
    assert merged(one) == merged(many)
    args = "".join(v for k, _, v in one if k == "args")
    if "get_weather" in text and "Text then" not in text:
        assert json.loads(args) == {"city": 'Pa"ris}{', "unit": "c"}


@pytest.mark.parametrize(("extra", "expected"), [
    ([], False),
    ([{"role": "assistant", "content": "no call", "tool_calls": None}], False),
    ([{"role": "assistant", "content": "no call", "tool_calls": []}], False),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                             "function": {"name": "f", "arguments": "{}"}}]}], True),
    ([{"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}], True),
    ([{"role": "tool", "tool_call_id": "c", "content": "1"}], True),
    ([{"role": "function", "name": "f", "content": "1"}], True),
], ids=["plain", "tool_calls None", "tool_calls empty", "tool call", "function call", "tool result",
        "function result"])
def test_tool_history_is_told_apart_from_plain_history(extra: list[dict[str, Any]], expected: bool) -> None:
    from local_llm_kit.structured import _has_tool_history

    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "ada"},
             {"role": "assistant", "content": "a"}]
    assert _has_tool_history([*plain, *extra]) is expected
    assert _has_tool_history([*extra, *plain]) is expected
