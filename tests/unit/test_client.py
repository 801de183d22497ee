"""The request path on the fake backend: shapes, streaming, limits, validation, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import openai.types.chat as oai
import pytest

from local_llm_kit import (
    AsyncLLMClient,
    CompletionResponse,
    InvalidRequestError,
    LLMClient,
    Stream,
    TokenLimitError,
)
from local_llm_kit.testing import FakeBackend, fake_client

HI = [{"role": "user", "content": "Hi"}]
REPLY = "Hello there, how are you? Café 🙂 done."


@pytest.fixture()
def client() -> LLMClient:
    c = fake_client(REPLY)
    assert isinstance(c, LLMClient)
    return c


def test_response_is_openai_shaped(client: LLMClient) -> None:
    response = client.chat.completions.create(messages=HI)
    assert isinstance(response, CompletionResponse)
    parsed = oai.ChatCompletion.model_validate(response.model_dump())
    assert parsed.choices[0].message.content == REPLY
    assert parsed.choices[0].finish_reason == "stop"
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response["choices"][0]["message"]["role"] == "assistant"


def test_usage_is_exact(client: LLMClient) -> None:
    response = client.chat.completions.create(messages=HI)
    assert response.usage.prompt_tokens == client.count_tokens(HI)
    # one token per byte, plus the end-of-turn token the model sampled
    assert response.usage.completion_tokens == len(REPLY.encode()) + 1
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_stream_concatenates_to_the_non_streamed_result(client: LLMClient) -> None:
    whole = client.chat.completions.create(messages=HI, stop=["done"])
    with client.chat.completions.create(messages=HI, stop=["done"], stream=True,
                                        stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    for chunk in chunks:
        oai.ChatCompletionChunk.model_validate(chunk.model_dump())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == REPLY[: REPLY.index("done")]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_closing_a_stream_stops_generation() -> None:
    backend = FakeBackend(REPLY)
    client = fake_client(backend=backend)
    stream = client.chat.completions.create(messages=HI, stream=True)
    assert isinstance(stream, Stream)
    next(stream), next(stream), next(stream)
    calls = len(backend.forward_calls)
    stream.close()
    assert list(stream) == []
    assert len(backend.forward_calls) == calls
    # the engine is free again: another request runs
    assert client.chat.completions.create(messages=HI).choices[0].message.content == REPLY


def test_interleaved_streams_on_one_thread_stay_correct() -> None:
    client = fake_client(lambda prompt: "AAAA" if "first" in prompt else "BBBB")
    s1 = client.chat.completions.create(messages=[{"role": "user", "content": "first"}], stream=True)
    s2 = client.chat.completions.create(messages=[{"role": "user", "content": "second"}], stream=True)
    out1, out2 = [], []
    for c1, c2 in zip(s1, s2, strict=True):
        out1.append(c1.choices[0].delta.content or "")
        out2.append(c2.choices[0].delta.content or "")
    assert "".join(out1) == "AAAA" and "".join(out2) == "BBBB"


def test_max_tokens_gives_length(client: LLMClient) -> None:
    response = client.chat.completions.create(messages=HI, max_tokens=5)
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content == "Hello"
    assert response.usage.completion_tokens == 5


def test_generation_stops_at_the_context_window() -> None:
    client = fake_client("x" * 500, backend=FakeBackend("x" * 500, n_ctx=64))
    response = client.chat.completions.create(messages=HI)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.total_tokens == 64


def test_prompt_over_the_context_raises_with_counts() -> None:
    client = fake_client(backend=FakeBackend(n_ctx=64))
    with pytest.raises(TokenLimitError) as info:
        client.chat.completions.create(messages=[{"role": "user", "content": "x" * 100}])
    err = info.value
    assert err.context_length == 64 and err.prompt_tokens > 64
    assert str(err.prompt_tokens) in str(err) and "64" in str(err)
    with pytest.raises(TokenLimitError) as info:
        client.chat.completions.create(messages=HI, max_tokens=60)
    assert info.value.max_tokens == 60 and info.value.param == "max_tokens"


def test_n_choices() -> None:
    client = fake_client(REPLY)
    response = client.chat.completions.create(messages=HI, n=3, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.message.content == REPLY for c in response.choices)
    assert response.usage.completion_tokens == 3 * (len(REPLY.encode()) + 1)


def test_seeded_sampling_is_reproducible_and_the_seed_matters() -> None:
    client = fake_client(REPLY)
    # temperature 2 and top_p 1 leave the scripted byte a probability far from 1 (logit margin 10 / 2
    # against 258 others), so sampling really chooses, and the seed decides what.
    def sample(seed: int) -> list[str | None]:
        response = client.chat.completions.create(messages=HI, n=2, temperature=2.0, top_p=1.0, seed=seed,
                                                  max_tokens=12)
        return [c.message.content for c in response.choices]

    first = sample(7)
    assert sample(7) == first
    assert first[0] != first[1]  # each choice gets its own seed
    assert len({tuple(sample(seed)) for seed in range(5)}) > 1


def test_logprobs(client: LLMClient) -> None:
    response = client.chat.completions.create(messages=HI, logprobs=True, top_logprobs=3, max_tokens=4)
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [t.token for t in content] == list("Hell")
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    assert all(t.logprob <= 0 for t in content)
    oai.ChatCompletion.model_validate(response.model_dump())


def test_logit_bias_and_penalties_change_the_choice() -> None:
    client = fake_client("a" * 10)
    # a bias of -100 on "a" makes another token win
    biased = client.chat.completions.create(messages=HI, temperature=0, logit_bias={ord("a"): -100}, max_tokens=2)
    assert "a" not in (biased.choices[0].message.content or "")
    plain = client.chat.completions.create(messages=HI, temperature=0, max_tokens=8)
    assert plain.choices[0].message.content == "a" * 8
    penalized = client.chat.completions.create(messages=HI, temperature=0, frequency_penalty=2.0, max_tokens=8)
    # the fake model's margin is 10; after 5 "a"s the penalty (2 per use) ties it, and another token wins
    content = penalized.choices[0].message.content or ""
    assert content.startswith("a" * 5) and content[5] != "a"


def test_content_parts_and_developer_role_are_accepted(client: LLMClient) -> None:
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]
    assert client.count_tokens(messages) == client.count_tokens(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "colour": "red"}]}, "messages[0].colour"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_1", "content": "4"}]},
     "messages[1].role"),  # a result with no call before it: OpenAI's 400 too
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
        {"role": "tool", "tool_call_id": "call_9", "content": "5"}]}, "messages[2].tool_call_id"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ({"n": 0}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 200}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": "yes"}, "stream"),
    ({"seed": "x"}, "seed"),
    ({"user": 5}, "user"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"store": True}, "store"),
    ({"temprature": 0.5}, "temprature"),
    ({"response_format": {"type": "text", "extra": 1}}, "response_format"),
]


@pytest.mark.parametrize(("overrides", "param"), BAD_REQUESTS)
def test_invalid_parameters_are_rejected_by_name(client: LLMClient, overrides: dict[str, Any], param: str) -> None:
    kwargs: dict[str, Any] = {"messages": HI, **overrides}
    before = list(client.engine.backend.cached_tokens)
    with pytest.raises(InvalidRequestError) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.param == param
    assert list(client.engine.backend.cached_tokens) == before  # nothing was evaluated


def test_a_tool_result_may_answer_the_call_memory_ends_with() -> None:
    call = {"id": "call_7", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    client = fake_client(backend=FakeBackend("2"))
    client.enable_memory(500)
    client.add_to_memory([{"role": "user", "content": "add 1"},
                          {"role": "assistant", "content": None, "tool_calls": [call]}])
    reply = client.chat.completions.create(messages=[{"role": "tool", "tool_call_id": "call_7", "content": "2"}])
    assert reply.choices[0].message.content == "2"
    with pytest.raises(InvalidRequestError) as info:  # the call is answered now: nothing is open
        client.chat.completions.create(messages=[{"role": "tool", "tool_call_id": "call_7", "content": "2"}])
    assert info.value.param == "messages[0].role"
    assert client.memory[-1] == {"role": "assistant", "content": "2"}  # the refused request changed nothing


async def test_async_client_create_and_stream() -> None:
    client = fake_client(REPLY, asynchronous=True)
    assert isinstance(client, AsyncLLMClient)
    response = await client.chat.completions.create(messages=HI)
    assert response.choices[0].message.content == REPLY
    stream = await client.chat.completions.create(messages=HI, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == REPLY


async def test_async_stream_close_stops_generation() -> None:
    backend = FakeBackend("z" * 1000, n_ctx=4096)
    client = fake_client(backend=backend, asynchronous=True)
    stream = await client.chat.completions.create(messages=HI, stream=True)
    async for _ in stream:
        break
    await stream.aclose()
    calls = len(backend.forward_calls)
    await asyncio.sleep(0.05)
    assert len(backend.forward_calls) == calls < 1000


async def test_cancelling_an_async_create_stops_generation() -> None:
    backend = FakeBackend("z" * 3000, n_ctx=4096)
    client = fake_client(backend=backend, asynchronous=True)
    task = asyncio.create_task(client.chat.completions.create(messages=HI))
    while len(backend.forward_calls) < 5:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    calls = len(backend.forward_calls)
    await asyncio.sleep(0.05)
    assert len(backend.forward_calls) == calls < 3000


def test_prefix_of_the_previous_turn_is_reused() -> None:
    backend = FakeBackend(REPLY)
    client = fake_client(backend=backend)
    first = client.chat.completions.create(messages=HI)
    prompt_len = first.usage.prompt_tokens
    assert backend.forward_calls[0] == prompt_len
    backend.forward_calls.clear()
    follow_up = [*HI, {"role": "assistant", "content": REPLY}, {"role": "user", "content": "And you?"}]
    client.chat.completions.create(messages=follow_up)
    new_prompt = client.count_tokens(follow_up)
    # only what follows the cached prefix is evaluated
    assert backend.forward_calls[0] < new_prompt - prompt_len


def test_backend_openai_without_httpx_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """It raised a bare ImportError, which is no LocalLLMKitError (the CLI printed a traceback)."""
    import sys

    from local_llm_kit import BackendNotAvailableError

    for name in [n for n in sys.modules if n == "httpx" or n.startswith(("httpx.", "local_llm_kit.remote"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "httpx", None)  # what an environment without httpx gives
    with pytest.raises(BackendNotAvailableError, match="needs httpx"):
        LLMClient(backend="openai", base_url="http://127.0.0.1:9/v1")


def test_fake_client_takes_the_context_length_asked() -> None:
    """fake_client(context_length=64) kept a 2,048-token fake model: a user's test of their
    TokenLimitError handling could never see one."""
    small = fake_client(context_length=64)
    assert small.engine.n_ctx == 64
    with pytest.raises(TokenLimitError) as info:
        small.chat.completions.create(messages=[{"role": "user", "content": "x" * 100}])
    assert info.value.context_length == 64
    with pytest.raises(InvalidRequestError) as mismatch:
        fake_client(backend=FakeBackend(n_ctx=128), context_length=64)
    assert mismatch.value.param == "context_length"


def test_the_testing_helpers_docs_run() -> None:
    """The examples in local_llm_kit.testing's docstring (how to script a reply and a tool call) hold."""
    import doctest

    import local_llm_kit.testing

    result = doctest.testmod(local_llm_kit.testing)
    assert result.attempted >= 7 and result.failed == 0
