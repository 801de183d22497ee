"""Every parameter openai-python users pass is honoured or rejected by name (issue 8, items 4-6)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from local_llm_kit import AsyncLLMClient, LLMClient
from local_llm_kit.errors import GenerationTimeoutError, InvalidRequestError
from local_llm_kit.testing import FakeBackend, fake_client

HI = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


@pytest.fixture
def client() -> LLMClient:
    made = fake_client("Hello there!")
    assert isinstance(made, LLMClient)
    return made


def _raises(client: LLMClient, param: str, **kwargs: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        client.chat.completions.create(messages=HI, **kwargs)
    assert info.value.param == param, info.value
    return info.value


def test_timeout_is_a_real_deadline_on_generation() -> None:
    backend = FakeBackend("s" * 1000, delay_s=0.01)
    client = fake_client(backend=backend)
    with pytest.raises(GenerationTimeoutError) as info:
        client.chat.completions.create(messages=HI, timeout=0.2)
    # Stopped early: the 1,000-token reply would take 10 s of forward passes.
    assert len(backend.forward_calls) < 900
    assert "0.2" in str(info.value) and isinstance(info.value, TimeoutError)
    stream = client.chat.completions.create(messages=HI, timeout=0.2, stream=True)
    with pytest.raises(GenerationTimeoutError):
        list(stream)
    assert not client.engine.lease.busy
    assert client.chat.completions.create(messages=HI, timeout=30, max_tokens=2).choices[0].message.content == "ss"


async def test_timeout_applies_to_async_requests_and_streams() -> None:
    client = fake_client(backend=FakeBackend("s" * 1000, delay_s=0.01), asynchronous=True)
    assert isinstance(client, AsyncLLMClient)
    with pytest.raises(GenerationTimeoutError):
        await client.chat.completions.create(messages=HI, timeout=0.2)
    stream = await client.chat.completions.create(messages=HI, timeout=0.2, stream=True)
    with pytest.raises(GenerationTimeoutError):
        async for _ in stream:
            pass


@pytest.mark.parametrize("value", [0, -1, "5", True])
def test_a_malformed_timeout_is_rejected(client: LLMClient, value: Any) -> None:
    _raises(client, "timeout", timeout=value)


def test_extra_body_parameters_are_applied_as_if_passed_by_name(client: LLMClient) -> None:
    reply = client.chat.completions.create(messages=HI, temperature=0, extra_body={"max_tokens": 3})
    assert reply.choices[0].message.content == "Hel" and reply.choices[0].finish_reason == "length"
    _raises(client, "extra_body.max_tokens", max_tokens=2, extra_body={"max_tokens": 3})
    _raises(client, "top_k", extra_body={"top_k": 3})
    _raises(client, "extra_body", extra_body=["max_tokens"])


def test_http_only_parameters_are_accepted_empty_and_rejected_with_values(client: LLMClient) -> None:
    assert client.chat.completions.create(messages=HI, extra_headers={}, extra_query=None).choices
    err = _raises(client, "extra_headers", extra_headers={"X-Trace": "1"})
    assert "backend='openai'" in str(err)
    _raises(client, "extra_query", extra_query={"a": "b"})


def test_store_false_is_accepted_and_store_true_or_metadata_are_rejected(client: LLMClient) -> None:
    assert client.chat.completions.create(messages=HI, store=False).choices
    _raises(client, "store", store=True)
    _raises(client, "metadata", metadata={"k": "v"})
    _raises(client, "audio", audio={"voice": "alloy", "format": "wav"})
    _raises(client, "maxtokens", maxtokens=5)


def test_user_is_written_to_the_request_log(client: LLMClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="local_llm_kit.requests"):
        client.chat.completions.create(messages=HI, user="user-1234")
    assert any("user-1234" in r.getMessage() for r in caplog.records if r.name == "local_llm_kit.requests")
    _raises(client, "user", user=12)


def test_an_assistant_refusal_is_rendered_as_what_the_assistant_said() -> None:
    seen: list[str] = []
    client = fake_client(lambda prompt: seen.append(prompt) or "ok")
    client.chat.completions.create(messages=[*HI, {"role": "assistant", "content": None, "refusal": "I can't."},
                                             {"role": "user", "content": "Why?"}])
    assert "I can't." in seen[-1]
    with pytest.raises(InvalidRequestError) as info:
        client.chat.completions.create(messages=[*HI, {"role": "assistant", "content": "a", "refusal": "b"}])
    assert info.value.param == "messages[1].refusal"


@pytest.mark.parametrize("key, value", [("annotations", [{"type": "url_citation"}]), ("audio", {"id": "a1"})])
def test_assistant_outputs_a_local_model_cannot_read_are_rejected(client: LLMClient, key: str, value: Any) -> None:
    message = {"role": "assistant", "content": "Sure.", key: value}
    with pytest.raises(InvalidRequestError) as info:
        client.chat.completions.create(messages=[*HI, message])
    assert info.value.param == f"messages[1].{key}"
    # A replayed response's empty fields are fine.
    client.chat.completions.create(messages=[*HI, {"role": "assistant", "content": "Sure.", key: None}])


async def test_sync_and_async_clients_validate_alike() -> None:
    sync = fake_client("x")
    asynchronous = fake_client("x", asynchronous=True)
    assert isinstance(sync, LLMClient) and isinstance(asynchronous, AsyncLLMClient)
    for bad in ({"stream": "yes"}, {"stream": 1}, {"timeout": -1}, {"store": True}, {"bogus": 1}):
        with pytest.raises(InvalidRequestError) as sync_error:
            sync.chat.completions.create(messages=HI, **bad)
        with pytest.raises(InvalidRequestError) as async_error:
            await asynchronous.chat.completions.create(messages=HI, **bad)
        assert (sync_error.value.param, str(sync_error.value)) == (async_error.value.param, str(async_error.value))


@pytest.mark.parametrize("kwargs", [
    {},
    {"tools": [TOOL]},
    {"tools": [TOOL], "tool_choice": "required"},
    {"tools": [TOOL], "tool_choice": "none"},
    {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    {"tools": [TOOL], "parallel_tool_calls": False},
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {
        "name": "city", "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}}},
    {"functions": [TOOL["function"]], "function_call": "auto"},
])
def test_count_tokens_equals_prompt_tokens_for_every_prompt_changing_argument(kwargs: dict[str, Any]) -> None:
    client = fake_client("{}")
    assert isinstance(client, LLMClient)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(messages=messages, max_tokens=200, **kwargs)
    assert client.count_tokens(messages, **kwargs) == reply.usage.prompt_tokens


def test_stream_options_include_usage_must_be_a_boolean(client: LLMClient) -> None:
    _raises(client, "stream_options.include_usage", stream=True, stream_options={"include_usage": "yes"})
    chunks = list(client.chat.completions.create(messages=HI, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].choices == []


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"messages": [{"role": "user", "content": "cut \ud83d"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": "Hi", "name": "a\ud800"}]}, "messages[0].name"),
    ({"messages": HI, "stop": ["\ud83d"]}, "stop"),
    ({"messages": HI, "tools": [{**TOOL, "function": {**TOOL["function"], "description": "x\ud83d"}}]},
     "tools[0].function.description"),
])
def test_text_with_a_lone_surrogate_is_rejected_by_name(client: LLMClient, kwargs: dict[str, Any],
                                                        param: str) -> None:
    # Valid in a Python str and in JSON ("\ud83d"), but no tokenizer can encode it.
    with pytest.raises(InvalidRequestError, match="lone surrogate") as info:
        client.chat.completions.create(**kwargs)
    assert info.value.param == param
    assert client.count_tokens(HI) > 0  # nothing was left half-done


def test_a_class_as_response_format_points_to_parse(client: LLMClient) -> None:
    from pydantic import BaseModel

    class City(BaseModel):
        name: str

    error = _raises(client, "response_format", response_format=City)
    assert "got the class City" in str(error) and "parse(" in str(error)


def test_text_modalities_are_what_a_local_model_gives(client: LLMClient) -> None:
    reply = client.chat.completions.create(messages=HI, modalities=["text"])  # type: ignore[call-arg]
    assert reply.choices[0].message.content == "Hello there!"
    for value in (["text", "audio"], ["audio"], "text"):
        _raises(client, "modalities", modalities=value)
