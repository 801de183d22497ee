"""``chat.completions.parse()``: openai-python's typed structured output, in-process."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from local_llm_kit import AsyncLLMClient, InvalidRequestError, LengthFinishReasonError, LLMClient, ParsedCompletion
from local_llm_kit.testing import fake_client

ASK = [{"role": "user", "content": "Ann is 3."}]


class Person(BaseModel):
    name: str
    age: int


def test_a_pydantic_class_comes_back_parsed() -> None:
    client = fake_client('{"name": "Ann", "age": 3}', temperature=0)
    assert isinstance(client, LLMClient)
    completion = client.chat.completions.parse(messages=ASK, response_format=Person)
    assert isinstance(completion, ParsedCompletion)
    message = completion.choices[0].message
    assert message.parsed == Person(name="Ann", age=3)
    assert message.content == '{"name": "Ann", "age": 3}'
    # the class's schema was sent as a strict json_schema response format (decoding was constrained)
    assert completion.usage.prompt_tokens == client.count_tokens(ASK, response_format={
        "type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema(), "strict": True}})


def test_a_reply_cut_by_max_tokens_raises_as_openai_does() -> None:
    client = fake_client('{"name": "Annabelle-Marie Okonkwo-Hale", "age": 3}', temperature=0)
    with pytest.raises(LengthFinishReasonError, match="max_tokens") as info:
        client.chat.completions.parse(messages=ASK, response_format=Person, max_tokens=30)
    assert info.value.completion.choices[0].finish_reason == "length"  # type: ignore[attr-defined]


class _PydanticFunctionTool(dict):  # type: ignore[type-arg]
    """The shape of what openai's ``pydantic_function_tool`` puts under "function" (a dict that
    keeps its model); the real one is checked in tests/server/test_server_openai.py (the oldest
    openai the dependency floors allow predates it)."""

    def __init__(self, definition: dict[str, object], model: type[BaseModel]) -> None:
        super().__init__(definition)
        self.model = model


def strict_tool(model: type[BaseModel]) -> dict[str, object]:
    schema = {**model.model_json_schema(), "additionalProperties": False}
    return {"type": "function", "function": _PydanticFunctionTool(
        {"name": model.__name__, "strict": True, "parameters": schema}, model)}


def test_strict_tools_get_parsed_arguments() -> None:
    call = '<tool_call>{"name": "Person", "arguments": {"name": "Ann", "age": 3}}</tool_call>'
    client = fake_client(call, temperature=0)
    tool = strict_tool(Person)
    completion = client.chat.completions.parse(messages=ASK, tools=[tool], tool_choice="required")
    assert completion.choices[0].message.tool_calls is not None
    assert completion.choices[0].message.tool_calls[0].function.parsed_arguments == Person(name="Ann", age=3)
    plain = {"type": "function", "function": dict(tool["function"])}  # type: ignore[call-overload]  # a strict dict
    completion = client.chat.completions.parse(messages=ASK, tools=[plain], tool_choice="required")
    assert completion.choices[0].message.tool_calls is not None
    assert completion.choices[0].message.tool_calls[0].function.parsed_arguments == {"name": "Ann", "age": 3}


def test_async_parse_and_bad_arguments() -> None:
    client = fake_client('{"name": "Ann", "age": 3}', temperature=0, asynchronous=True)
    assert isinstance(client, AsyncLLMClient)
    completion = asyncio.run(client.chat.completions.parse(messages=ASK, response_format=Person))
    assert completion.choices[0].message.parsed == Person(name="Ann", age=3)
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(client.chat.completions.parse(messages=ASK, response_format=Person, stream=True))
    assert info.value.param == "stream"
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(client.chat.completions.parse(messages=ASK, response_format=int))
    assert info.value.param == "response_format"
