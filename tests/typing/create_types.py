"""Checked by mypy in tests/unit/test_typing.py (never imported): what editors see of create()."""

from __future__ import annotations

from typing import assert_type

from local_llm_kit import AsyncLLMClient, AsyncStream, CompletionChunk, CompletionResponse, LLMClient, Stream

client = LLMClient()
messages = [{"role": "user", "content": "Hi"}]

assert_type(client.chat.completions.create(messages=messages), CompletionResponse)
assert_type(client.chat.completions.create(messages=messages, stream=False), CompletionResponse)
assert_type(client.chat.completions.create(messages=messages, stream=True), Stream[CompletionChunk])
flag: bool = bool(len(messages))
assert_type(client.chat.completions.create(messages=messages, stream=flag),
            CompletionResponse | Stream[CompletionChunk])
assert_type(client.count_tokens(messages, tool_choice="none"), int)


async def asynchronous() -> None:
    aclient = AsyncLLMClient()
    assert_type(await aclient.chat.completions.create(messages=messages), CompletionResponse)
    assert_type(await aclient.chat.completions.create(messages=messages, stream=True), AsyncStream[CompletionChunk])


def test_helpers() -> None:
    from local_llm_kit.testing import fake_client

    assert_type(fake_client("Hi"), LLMClient)  # usable where user code wants an LLMClient
    assert_type(fake_client("Hi", asynchronous=True), AsyncLLMClient)
    assert_type(fake_client("Hi", asynchronous=flag), LLMClient | AsyncLLMClient)
