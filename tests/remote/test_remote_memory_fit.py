"""backend="openai" with memory: when the server says a request does not fit its context, the
oldest remembered turns are left out, one more each time, and the shorter request is sent.

A weight-free fake model with a 256-token context (its tokenizer is bytewise) behind our server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from local_llm_kit import AsyncLLMClient, LLMClient, TokenLimitError
from local_llm_kit.testing import FakeBackend, fake_client
from tests.server.conftest import RunningServer, running_server

REPLY = "ok"
# Each turn is about 180 tokens: only the newest one fits beside a new question in 256.
HISTORY = [message
           for i in range(3)
           for message in ({"role": "user", "content": f"{i}" * 80}, {"role": "assistant", "content": f"{i}" * 80})]
QUESTION = [{"role": "user", "content": "and now?"}]


@pytest.fixture(scope="module")
def small_server() -> Iterator[RunningServer]:
    served = fake_client(REPLY, backend=FakeBackend(REPLY, n_ctx=256), asynchronous=True, temperature=0)
    with running_server(served) as running:
        yield running


def _remembering(cls: type[LLMClient] | type[AsyncLLMClient], server: RunningServer) -> LLMClient | AsyncLLMClient:
    client = cls("fake-model", backend="openai", base_url=server.base_url, temperature=0)
    client.enable_memory(max_tokens=1000)  # more than the server's context: the server's answer decides
    client.add_to_memory(HISTORY)
    return client


def test_oldest_turns_are_left_out_until_the_server_accepts(small_server: RunningServer,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    client = _remembering(LLMClient, small_server)
    assert isinstance(client, LLMClient)
    with client, caplog.at_level(logging.INFO, logger="local_llm_kit.remote"):
        reply = client.chat.completions.create(messages=QUESTION, max_tokens=4)
        assert reply.choices[0].message.content == REPLY
        # The server counted the newest turn and the question only.
        assert reply.usage.prompt_tokens == client.count_tokens(HISTORY[-2:] + QUESTION)
        assert "leaving out the 2 oldest turns" in caplog.text
        # Memory keeps everything within its own budget: leaving out is per request.
        assert client.memory == [*HISTORY, *QUESTION, {"role": "assistant", "content": REPLY}]


async def test_async_and_streaming_leave_out_the_same_turns(small_server: RunningServer) -> None:
    client = _remembering(AsyncLLMClient, small_server)
    assert isinstance(client, AsyncLLMClient)
    async with client:
        stream = await client.chat.completions.create(messages=QUESTION, max_tokens=4, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text == REPLY
        assert client.memory[-1] == {"role": "assistant", "content": REPLY}


def test_a_question_that_fits_no_way_raises(small_server: RunningServer) -> None:
    client = _remembering(LLMClient, small_server)
    assert isinstance(client, LLMClient)
    with client, pytest.raises(TokenLimitError) as overflow:
        client.chat.completions.create(messages=[{"role": "user", "content": "x" * 300}], max_tokens=4)
    assert overflow.value.context_length == 256
    assert client.memory == HISTORY  # a failed call remembers nothing
