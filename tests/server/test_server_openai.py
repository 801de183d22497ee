"""The official ``openai`` client against our server, serving the embedded SmolLM2 on llama.cpp."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import RunningServer

pytestmark = pytest.mark.integration

Q = [{"role": "user", "content": "List three fruits."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
MODEL = "smollm2-135m-instruct"


@pytest.fixture()
def client(smol_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=smol_server.base_url, api_key="test-key", max_retries=0) as c:
        yield c


def test_completion_matches_in_process(client: openai.OpenAI, cache_dir: Path) -> None:
    from local_llm_kit import LLMClient

    served = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=24, temperature=0)
    local = LLMClient(MODEL, temperature=0, cache_dir=cache_dir, n_threads=1).chat.completions.create(
        messages=Q, max_tokens=24)
    assert served.choices[0].message.content == local.choices[0].message.content
    assert served.usage is not None and served.usage.prompt_tokens == local.usage.prompt_tokens
    assert served.model == MODEL and served.choices[0].finish_reason in ("stop", "length")
    assert (served._request_id or "").startswith("req_")  # openai reads it from x-request-id


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=Q, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens  # type: ignore[union-attr]


def test_async_client(smol_server: RunningServer) -> None:
    async def main() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=smol_server.base_url, api_key="test-key") as client:
            reply = await client.chat.completions.create(model=MODEL, messages=Q, max_tokens=16, temperature=0)
            parts = []
            async for chunk in await client.chat.completions.create(model=MODEL, messages=Q, max_tokens=16,
                                                                    temperature=0, stream=True):
                parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            return reply.choices[0].message.content or "", "".join(parts)

    whole, streamed = asyncio.run(main())
    assert whole and whole == streamed


def test_tools(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
        tool_choice="required", max_tokens=400)
    call = response.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert response.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    streamed = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=400, stream=True))
    arguments = "".join(d.function.arguments or "" for c in streamed if c.choices
                        for d in c.choices[0].delta.tool_calls or [] if d.function)
    assert "city" in json.loads(arguments)


def test_openai_stream_helper_accumulates_tool_calls(client: openai.OpenAI) -> None:
    """openai's ``chat.completions.stream()`` merges deltas itself; a continuation chunk that sent
    ``"type": null`` broke its tool-call snapshot (AssertionError inside openai)."""
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    whole = client.chat.completions.create(model=MODEL, messages=question, tools=[WEATHER],
                                           tool_choice="required", max_tokens=60, temperature=0)
    with client.chat.completions.stream(model=MODEL, messages=question, tools=[WEATHER],
                                        tool_choice="required", max_tokens=60, temperature=0) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    [call] = final.choices[0].message.tool_calls or []
    [expected] = whole.choices[0].message.tool_calls or []
    assert (call.type, call.function.name, call.function.arguments) == (
        "function", expected.function.name, expected.function.arguments)
    assert call.id.startswith("call_")  # the id of the first chunk, kept by the merge


def test_response_format(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person."}], max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    person = json.loads(response.choices[0].message.content or "")
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    parsed = client.beta.chat.completions.parse(  # openai's own helper, pydantic in and out
        model=MODEL, messages=[{"role": "user", "content": "Invent a person."}], max_tokens=60,
        response_format=_person_model())
    assert parsed.choices[0].message.parsed is not None


def _person_model() -> Any:
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    return Person


def test_errors_map_to_openai_exceptions(client: openai.OpenAI, smol_server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=Q, temperature=5)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    assert overflow.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=Q)
    with pytest.raises(openai.AuthenticationError), \
            openai.OpenAI(base_url=smol_server.base_url, api_key="wrong", max_retries=0) as wrong:
        wrong.chat.completions.create(model=MODEL, messages=Q)
    assert [m.id for m in client.models.list()] == [MODEL]


def test_load_streaming_and_not(smol_server: RunningServer) -> None:
    """A small bounded load: 24 requests at concurrency 4, half streaming; all succeed, all valid."""
    failures: list[str] = []
    texts: list[str] = []
    lock = threading.Lock()

    def worker(jobs: list[int]) -> None:
        with openai.OpenAI(base_url=smol_server.base_url, api_key="test-key", max_retries=0) as client:
            for job in jobs:
                try:
                    if job % 2:
                        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                            model=MODEL, messages=Q, max_tokens=8, stream=True, temperature=0) if c.choices)
                    else:
                        text = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=8,
                                                              temperature=0).choices[0].message.content or ""
                except Exception as exc:  # collected: the test reports every failure
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    texts.append(text)

    threads = [threading.Thread(target=worker, args=(list(range(i, 24, 4)),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(texts) == 24 and len(set(texts)) == 1 and texts[0]  # greedy: every answer the same


def test_dropped_streams_leave_nothing_decoding(smol_server: RunningServer, client: openai.OpenAI) -> None:
    for _ in range(10):
        stream = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=200, stream=True)
        next(iter(stream))
        stream.close()  # drops the connection mid-generation
    deadline = time.monotonic() + 30
    while (health := httpx.get(smol_server.url + "/health").json())["generating"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health == {"status": "ok", "generating": 0, "waiting": 0}
    assert not smol_server.app.state.server.models.default.client.engine.lease.busy, \
        "a dropped stream still holds the model"
    after = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=5, temperature=0)
    assert after.usage is not None and after.usage.completion_tokens == 5


def test_parse_takes_openai_pydantic_function_tool_in_process() -> None:
    from pydantic import BaseModel

    from local_llm_kit.testing import fake_client

    class Person(BaseModel):
        name: str
        age: int

    call = '<tool_call>{"name": "Person", "arguments": {"name": "Ann", "age": 3}}</tool_call>'
    client = fake_client(call, temperature=0)
    completion = client.chat.completions.parse(  # type: ignore[union-attr]
        messages=[{"role": "user", "content": "Ann is 3."}], tools=[openai.pydantic_function_tool(Person)],
        tool_choice="required")
    assert completion.choices[0].message.tool_calls[0].function.parsed_arguments == Person(name="Ann", age=3)
