"""The opt-in repetition guard: structured output closed early once the model loops (fake backend)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from local_llm_kit.closing import MIN_SPAN, repeated_unit
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.testing import fake_client

Q = [{"role": "user", "content": "Go."}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "tags"]}
FMT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
LOOPING_STRING = '{"name": "Bo' + "la" * 4000
LOOPING_ARRAY = '{"name": "Bo", "tags": [' + '"x", ' * 2000
WHOLE = '{"name": "Bo", "tags": ["a", "b"]}'
TRIP = {"type": "object", "properties": {"destination": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["destination", "days"]}
TOOLS = [{"type": "function", "function": {"name": "book_trip", "parameters": TRIP}}]
LOOPING_CALL = '<tool_call>{"name": "book_trip", "arguments": {"destination": "Lisbon' + "_Lisbon" * 3000


def create(reply: str, **kwargs: Any) -> Any:
    client = fake_client(reply=reply, temperature=0)
    return client.chat.completions.create(messages=Q, **kwargs)


def test_repeated_unit() -> None:
    assert repeated_unit([9, 1, 2, 3] * 6, 4) == 4
    assert repeated_unit([7, 8, 9] * 6, 4) == 3
    assert repeated_unit([7, 8, 9] * 5, 4) is None  # 15 tokens: shorter than the span a loop must cover
    assert repeated_unit([5] * (MIN_SPAN - 1), 4) is None  # a long number is not a loop yet
    assert repeated_unit([5] * MIN_SPAN, 4) == 1
    assert repeated_unit([1, 2] * 20 + [3], 4) is None  # the loop ended
    assert repeated_unit(list(range(100)), 2) is None


@pytest.mark.parametrize("reply", [LOOPING_STRING, LOOPING_ARRAY])
def test_a_looping_reply_is_closed_early(reply: str) -> None:
    guarded = create(reply, response_format=FMT, max_tokens=400, repetition_guard=True)
    choice = guarded.choices[0]
    value = json.loads(choice.message.content)
    jsonschema.validate(value, PERSON)
    assert choice.finish_reason == "length"  # cut, as by the budget: the model had not ended it
    assert guarded.usage.completion_tokens < 60  # not at max_tokens
    # The model's own text up to the loop, then closed.
    assert value["name"].startswith("Bolalalala") if reply is LOOPING_STRING else (
        value["name"] == "Bo" and value["tags"].count("x") >= 4 and set(value["tags"]) <= {"x", ""})
    unguarded = create(reply, response_format=FMT, max_tokens=400)
    assert unguarded.usage.completion_tokens > 390  # off by default: closed at the end of the budget


def test_more_repeats_allowed_keep_more_of_the_reply() -> None:
    lengths = [create(LOOPING_STRING, response_format=FMT, max_tokens=400, repetition_guard=repeats)
               .usage.completion_tokens for repeats in (4, 20, 40)]
    assert lengths[0] < lengths[1] < lengths[2] < 400


def test_a_looping_tool_call_is_closed_early() -> None:
    response = create(LOOPING_CALL, tools=TOOLS, tool_choice="required", max_tokens=500,
                      extra_body={"repetition_guard": 3})
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert [c.function.name for c in choice.message.tool_calls] == ["book_trip"]
    arguments = json.loads(choice.message.tool_calls[0].function.arguments)
    jsonschema.validate(arguments, TRIP)
    assert arguments["destination"].startswith("Lisbon_Lisbon") and len(arguments["destination"]) < 60
    stream = create(LOOPING_CALL, tools=TOOLS, tool_choice="required", max_tokens=500,
                    extra_body={"repetition_guard": 3}, stream=True)
    chunks = list(stream)
    streamed = "".join(part.function.arguments or "" for c in chunks for part in c.choices[0].delta.tool_calls or [])
    assert streamed == choice.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_reply_that_does_not_loop_is_unchanged() -> None:
    for reply in (WHOLE, '{"name": "' + "1000000" * 2 + '", "tags": []}'):
        guarded = create(reply, response_format=FMT, max_tokens=200, repetition_guard=True).choices[0]
        assert (guarded.message.content, guarded.finish_reason) == (reply, "stop")


@pytest.mark.parametrize("value", ["yes", 1, -1, 1001, 2.5])
def test_a_bad_value_is_refused_by_name(value: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        create(WHOLE, response_format=FMT, repetition_guard=value)
    assert info.value.param == "repetition_guard"


@pytest.mark.parametrize("value", [None, False, 0])
def test_off_values(value: object) -> None:
    response = create(LOOPING_STRING, response_format=FMT, max_tokens=120, repetition_guard=value)
    assert response.usage.completion_tokens > 110


def test_without_constrained_output_the_guard_is_refused() -> None:
    for kwargs in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        with pytest.raises(InvalidRequestError, match="constrained output") as info:
            create("hello", repetition_guard=True, **kwargs)
        assert info.value.param == "repetition_guard"
