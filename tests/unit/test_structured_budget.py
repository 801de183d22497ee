"""Structured output valid at every finish (fake backend): budget-aware closing, bounded calls, ``strict``."""

from __future__ import annotations

import json
import logging
from typing import Any

import jsonschema
import pytest

from local_llm_kit.calls import native_format
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.templates import ChatTemplate
from local_llm_kit.testing import FakeBackend, fake_client
from local_llm_kit.tools import MAX_PARALLEL_CALLS

Q = [{"role": "user", "content": "Go."}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
                "required": ["city", "zip"]},
    "age": {"type": "integer", "minimum": 18}}, "required": ["name", "tags", "address", "age"]}
LOOPING_JSON = '{"name": "' + "la" * 4000  # a model stuck inside a string
LOOPING_ARRAY = '{"name": "Bo", "tags": [' + '"x", ' * 2000
WEATHER = {"type": "object", "properties": {"destination": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["destination", "days"]}
TOOLS = [{"type": "function", "function": {"name": "book_trip", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}]
LOOPING_CALL = '<tool_call>{"name": "book_trip", "arguments": {"destination": "Lisbon' + "_Lisbon" * 3000
ONE_CALL = '<tool_call>{"name": "book_trip", "arguments": {"destination": "Oslo", "days": 2}}</tool_call>'


def schema_format(schema: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, **extra}}


def create(reply: Any, backend: FakeBackend | None = None, **kwargs: Any) -> Any:
    client = fake_client(reply=reply, backend=backend, temperature=0)
    return client.chat.completions.create(messages=kwargs.pop("messages", Q), **kwargs)


def streamed(reply: Any, **kwargs: Any) -> tuple[str, list[list[str]], str | None, list[str]]:
    content, calls, reason, violations = "", {}, None, []
    for chunk in create(reply, stream=True, **kwargs):
        choice = chunk.choices[0]
        reason = choice.finish_reason or reason
        content += choice.delta.content or ""
        violations += choice.delta.schema_violations or []
        for part in choice.delta.tool_calls or []:
            entry = calls.setdefault(part.index, ["", ""])
            entry[0] += part.function.name or ""
            entry[1] += part.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], reason, violations


# -- budget-aware closing ------------------------------------------------------------------
@pytest.mark.parametrize("reply", [LOOPING_JSON, LOOPING_ARRAY])
def test_every_budget_gives_a_valid_reply(reply: str) -> None:
    fmt = schema_format(PERSON)
    lengths = []
    for max_tokens in range(71, 180, 9):  # 71: the shortest valid reply in bytes
        response = create(reply, response_format=fmt, max_tokens=max_tokens)
        choice = response.choices[0]
        assert choice.finish_reason == "length"  # it was cut, and says so
        assert response.usage.completion_tokens <= max_tokens
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        lengths.append(response.usage.completion_tokens)
        assert streamed(reply, response_format=fmt, max_tokens=max_tokens)[:3] == (
            choice.message.content, [], "length")
    assert lengths[-1] > lengths[0]  # the model's own text fills what the budget allows


def test_closing_uses_the_budget_it_has() -> None:
    response = create(LOOPING_JSON, response_format=schema_format(PERSON), max_tokens=300)
    value = json.loads(response.choices[0].message.content)
    assert value["name"].startswith("lalala") and len(value["name"]) > 200
    assert response.usage.completion_tokens >= 290  # closed at the end, not early


def test_a_budget_below_the_shortest_reply_is_rejected_before_generation() -> None:
    calls: list[str] = []
    with pytest.raises(InvalidRequestError, match="shortest valid one takes 71 tokens") as info:
        create(lambda p: calls.append(p) or LOOPING_JSON, response_format=schema_format(PERSON), max_tokens=70)
    assert info.value.param == "max_tokens"
    assert calls == []  # nothing was generated


def test_the_context_window_is_a_budget_too() -> None:
    backend = FakeBackend(LOOPING_JSON, n_ctx=700)
    response = create(LOOPING_JSON, backend=backend, response_format=schema_format(PERSON))
    assert response.choices[0].finish_reason == "length"
    assert response.usage.total_tokens == 700  # the whole window, and not a token past it
    jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)


def test_json_object_mode_closes_too() -> None:
    response = create(LOOPING_JSON, response_format={"type": "json_object"}, max_tokens=12)
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_temperature_sampling_stays_valid_at_every_finish() -> None:
    client = fake_client(reply=LOOPING_JSON)
    reasons = []
    for seed in range(4):
        response = client.chat.completions.create(messages=Q, max_tokens=90, temperature=1.5, seed=seed,
                                                  response_format=schema_format(PERSON))
        jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)
        reasons.append(response.choices[0].finish_reason)
    assert reasons == ["length"] * 4


# -- tool calls ----------------------------------------------------------------------------
NAMED = {"type": "function", "function": {"name": "book_trip"}}


@pytest.mark.parametrize("tool_choice", ["required", NAMED, "auto"])
def test_a_looping_call_is_completed_at_every_budget(tool_choice: Any) -> None:
    for max_tokens in (89, 97, 113, 150):  # 89: the shortest valid call in bytes
        response = create(LOOPING_CALL, tools=TOOLS, tool_choice=tool_choice, max_tokens=max_tokens)
        choice = response.choices[0]
        assert choice.finish_reason == "length"
        assert [c.function.name for c in choice.message.tool_calls] == ["book_trip"]
        arguments = json.loads(choice.message.tool_calls[0].function.arguments)
        jsonschema.validate(arguments, WEATHER)
        assert LOOPING_CALL.split('"destination": "')[1].startswith(arguments["destination"])
        assert len(arguments["destination"]) >= max_tokens - 100  # the model's text, up to the closing
        _, calls, reason, _ = streamed(LOOPING_CALL, tools=TOOLS, tool_choice=tool_choice,
                                             max_tokens=max_tokens)
        assert (calls, reason) == ([["book_trip", choice.message.tool_calls[0].function.arguments]], "length")


def test_named_choice_gives_exactly_one_call() -> None:
    response = create(ONE_CALL * 5, tools=TOOLS, tool_choice=NAMED, max_tokens=400)
    assert len(response.choices[0].message.tool_calls) == 1
    assert response.choices[0].finish_reason == "tool_calls"


def test_parallel_calls_are_bounded() -> None:
    response = create(ONE_CALL * 20, FakeBackend(ONE_CALL * 20, n_ctx=8192), tools=TOOLS, tool_choice="required",
                      max_tokens=2000)
    calls = response.choices[0].message.tool_calls
    assert len(calls) == MAX_PARALLEL_CALLS
    assert response.choices[0].finish_reason == "tool_calls"  # ended by the bound, not by max_tokens
    assert response.usage.completion_tokens < 2000


TIME_CALL = '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>'
SHORTEST_CALL = '<tool_call>{"name": "get_time", "arguments": {"tz": ""}}</tool_call>'  # 68 bytes


@pytest.mark.parametrize("parallel", [True, False])
def test_the_shortest_reply_of_a_tool_set_is_its_shortest_single_call(parallel: bool) -> None:
    # The search used to estimate the first call it met (book_trip, 89 tokens; before that, eight
    # calls in a row with parallel calls: 8 x 30 tokens for LangChain's ``add``); the grammar may
    # end after any one call, so the minimum is the shortest one (get_time, 68).
    with pytest.raises(InvalidRequestError, match=f"takes {len(SHORTEST_CALL)} tokens"):
        create(TIME_CALL, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
               max_tokens=len(SHORTEST_CALL) - 1)
    # 80 holds one get_time call but not the estimate of 89: the request runs and returns one whole call.
    response = create(TIME_CALL * 5, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                      max_tokens=80)
    choice = response.choices[0]
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_time", '{"tz": "UTC"}')]
    assert choice.finish_reason == ("length" if parallel else "tool_calls")  # cut before a second call
    assert streamed(TIME_CALL * 5, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel,
                    max_tokens=80)[1:3] == ([["get_time", '{"tz": "UTC"}']], choice.finish_reason)


def test_a_budget_that_holds_only_the_shortest_call_steers_to_it() -> None:
    # The model wants book_trip, which cannot fit: the closing takes the tool whose call does.
    for max_tokens in (len(SHORTEST_CALL), 75):
        response = create(LOOPING_CALL, tools=TOOLS, tool_choice="required", max_tokens=max_tokens)
        calls = response.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == ["get_time"]
        assert isinstance(json.loads(calls[0].function.arguments)["tz"], str)
        assert response.choices[0].finish_reason == "length"


def test_calls_after_the_first_are_completed_or_not_started() -> None:
    for max_tokens in range(89, 260, 9):
        response = create(ONE_CALL + LOOPING_CALL, tools=TOOLS, tool_choice="required", max_tokens=max_tokens)
        for call in response.choices[0].message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_legacy_function_call_is_completed() -> None:
    response = create(LOOPING_CALL, functions=[t["function"] for t in TOOLS], function_call={"name": "book_trip"},
                      max_tokens=90)
    jsonschema.validate(json.loads(response.choices[0].message.function_call.arguments), WEATHER)


# -- strict --------------------------------------------------------------------------------
UNIQUE = {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"},
                                                   "uniqueItems": True}}, "required": ["ids"]}


def test_non_strict_schema_with_unenforced_keywords_is_accepted_and_checked() -> None:
    duplicate = '{"ids": [1, 1]}'
    response = create(duplicate, response_format=schema_format(UNIQUE))
    message = response.choices[0].message
    assert message.content == duplicate
    assert message.schema_violations and "uniqueItems" in message.schema_violations[0]
    assert "/ids" in message.schema_violations[0]
    assert streamed(duplicate, response_format=schema_format(UNIQUE))[3] == message.schema_violations
    fine = create('{"ids": [1, 2]}', response_format=schema_format(UNIQUE)).choices[0].message
    assert fine.schema_violations is None and "schema_violations" not in fine.model_dump(exclude_none=True)


def test_strict_schema_names_the_keyword_it_cannot_enforce() -> None:
    with pytest.raises(InvalidRequestError, match="uniqueItems") as info:
        create("{}", response_format=schema_format(UNIQUE, strict=True))
    assert info.value.param == "response_format"
    tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": UNIQUE}}
    with pytest.raises(InvalidRequestError, match="uniqueItems") as info:
        create("{}", tools=[tool])
    assert info.value.param == "tools[0].function.parameters"


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 3}}}, "required": ["a"]}, "not"),
    ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
      "dependencies": {"a": ["b"]}}, "dependencies"),
    ({"type": "object", "properties": {"p": {"type": "string", "format": "path"}}, "required": ["p"]},
     "format: path"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
])
def test_non_strict_relaxes_exactly_what_cannot_be_enforced(schema: dict[str, Any], keyword: str) -> None:
    with pytest.raises(InvalidRequestError, match=keyword.split(":")[0].split()[0]):
        create("{}", response_format=schema_format(schema, strict=True))
    response = create('{"a": 3}', response_format=schema_format(schema), max_tokens=40)
    text = response.choices[0].message.content
    json.loads(text)  # whatever the model wrote, it is JSON; broken unenforced keywords are reported
    violations = response.choices[0].message.schema_violations or []
    try:
        jsonschema.validate(json.loads(text), schema)
        assert violations == []
    except jsonschema.ValidationError:
        assert violations


def test_non_strict_tool_arguments_are_checked() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": UNIQUE}}
    call = '<tool_call>{"name": "f", "arguments": {"ids": [2, 2]}}</tool_call>'
    message = create(call, tools=[tool], tool_choice="required").choices[0].message
    assert json.loads(message.tool_calls[0].function.arguments) == {"ids": [2, 2]}
    assert message.schema_violations and message.schema_violations[0].startswith("tool_calls[0] (f)")


def test_a_reply_with_violations_can_be_sent_back_as_history() -> None:
    message = create('{"ids": [1, 1]}', response_format=schema_format(UNIQUE)).choices[0].message
    history = [*Q, message.model_dump(exclude_none=True), {"role": "user", "content": "again"}]
    assert create("ok", messages=history).choices[0].message.content == "ok"


# -- calls.py: the probe of a template's call format ----------------------------------------
class _BrokenTemplate(ChatTemplate):
    def __init__(self, error: Exception) -> None:
        super().__init__("{{ tools }}")
        self.error = error

    def render(self, *args: Any, **kwargs: Any) -> str:
        raise self.error


def test_template_that_rejects_the_probe_falls_back_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from local_llm_kit.errors import TemplateError

    with caplog.at_level(logging.INFO, logger="local_llm_kit.calls"):
        assert native_format(_BrokenTemplate(TemplateError("no tools here"))) is None
    assert "generic call format" in caplog.text and "no tools here" in caplog.text


def test_unexpected_errors_in_the_probe_are_not_swallowed() -> None:
    with pytest.raises(RuntimeError, match="bug"):
        native_format(_BrokenTemplate(RuntimeError("bug")))
    with pytest.raises(KeyboardInterrupt):
        native_format(_BrokenTemplate(KeyboardInterrupt()))
