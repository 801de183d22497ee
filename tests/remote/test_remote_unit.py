"""backend="openai" against our server over a weight-free fake model: the client side of the protocol.

Validation before sending, our response types, streams, async, errors mapped, retries only where
safe, exact token counts, memory over HTTP, settings.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from local_llm_kit import (
    AsyncLLMClient,
    AsyncStream,
    CompletionChunk,
    CompletionResponse,
    GenerationTimeoutError,
    InvalidRequestError,
    LLMClient,
    ModelNotFoundError,
    Stream,
    TokenLimitError,
)
from local_llm_kit.remote import RemoteServerError
from local_llm_kit.server import ServerLimits
from local_llm_kit.testing import FakeBackend, fake_client
from tests.server.conftest import RunningServer, running_server

REPLY = "Hello over HTTP!"
Q = [{"role": "user", "content": "Hi"}]
KEY = "unit-key"


class CountingBackend(FakeBackend):
    """Counts forward passes, optionally slowly: lets tests see what the server computed."""

    def __init__(self, reply: str, delay: float = 0.0) -> None:
        super().__init__(reply)
        self.delay = delay
        self.forwards = 0

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        self.forwards += 1
        if self.delay:
            time.sleep(self.delay)
        return super().forward(tokens)


@pytest.fixture(scope="module")
def backend() -> CountingBackend:
    return CountingBackend(REPLY)


@pytest.fixture(scope="module")
def server(backend: CountingBackend) -> Iterator[RunningServer]:
    served = fake_client(REPLY, backend=backend, asynchronous=True, temperature=0)
    with running_server(served, api_key=KEY, limits=ServerLimits(max_tokens=100)) as running:
        yield running


@pytest.fixture()
def client(server: RunningServer) -> Iterator[LLMClient]:
    with LLMClient(backend="openai", base_url=server.base_url, api_key=KEY, temperature=0) as remote:
        yield remote


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_create_returns_our_types(client: LLMClient) -> None:
    response = client.chat.completions.create(messages=Q)
    assert isinstance(response, CompletionResponse)
    assert response.choices[0].message.content == REPLY and response.model == "fake-model"
    assert client.model == "fake-model"  # the server's only model, when none is named


def test_stream(client: LLMClient) -> None:
    stream = client.chat.completions.create(messages=Q, stream=True, stream_options={"include_usage": True})
    assert isinstance(stream, Stream)
    chunks = list(stream)
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_async(server: RunningServer) -> None:
    async def main() -> tuple[str, str]:
        async with AsyncLLMClient(backend="openai", base_url=server.base_url, api_key=KEY) as remote:
            whole = await remote.chat.completions.create(messages=Q)
            stream = await remote.chat.completions.create(messages=Q, stream=True)
            assert isinstance(stream, AsyncStream)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return whole.choices[0].message.content or "", "".join(parts)

    assert asyncio.run(main()) == (REPLY, REPLY)


def test_validation_happens_before_sending() -> None:
    # Nothing listens there: a validation error proves nothing was sent.
    remote = LLMClient("any", backend="openai", base_url=closed_port(), max_retries=0)
    for kwargs, param in (({"temperature": 5}, "temperature"), ({"top_logprobs": 2}, "top_logprobs"),
                          ({"frobnicate": 1}, "frobnicate"), ({"tools": "x"}, "tools"),
                          ({"response_format": {"type": "xml"}}, "response_format")):
        with pytest.raises(InvalidRequestError) as caught:
            remote.chat.completions.create(messages=Q, **kwargs)  # type: ignore[call-overload]
        assert caught.value.param == param
    with pytest.raises(InvalidRequestError):
        remote.chat.completions.create(messages=[{"role": "robot", "content": "x"}])


def test_unreachable_server_is_a_clear_error() -> None:
    remote = LLMClient("any", backend="openai", base_url=closed_port(), max_retries=1)
    started = time.monotonic()
    with pytest.raises(RemoteServerError, match="cannot connect") as caught:
        remote.chat.completions.create(messages=Q)
    assert caught.value.status is None
    assert time.monotonic() - started >= 0.5  # one retry after a backoff: refused connections are safe to retry
    with pytest.raises(RemoteServerError, match="cannot connect"):
        remote.chat.completions.create(messages=Q, stream=True)


def test_server_errors_are_mapped(server: RunningServer, client: LLMClient) -> None:
    with pytest.raises(InvalidRequestError) as caught:  # over the server's own limit: its 400
        client.chat.completions.create(messages=Q, max_tokens=101)
    assert caught.value.param == "max_tokens"
    with pytest.raises(TokenLimitError) as overflow:
        client.chat.completions.create(messages=[{"role": "user", "content": "x" * 3000}])
    assert overflow.value.context_length == 2048 and overflow.value.prompt_tokens > 2048
    with pytest.raises(ModelNotFoundError):
        LLMClient("gpt-4o", backend="openai", base_url=server.base_url, api_key=KEY).chat.completions.create(
            messages=Q)
    with pytest.raises(RemoteServerError) as refused:
        LLMClient("fake-model", backend="openai", base_url=server.base_url, api_key="wrong",
                  max_retries=0).chat.completions.create(messages=Q)
    assert refused.value.status == 401
    with pytest.raises(RemoteServerError, match="/v1") as wrong_path:
        LLMClient("fake-model", backend="openai", base_url=server.url + "/v2", api_key=KEY,
                  max_retries=0).chat.completions.create(messages=Q)
    assert wrong_path.value.status == 404


def test_count_tokens_is_exact(client: LLMClient) -> None:
    usage = client.chat.completions.create(messages=Q).usage
    assert client.count_tokens(Q) == usage.prompt_tokens
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with_tools = client.chat.completions.create(messages=Q, tools=tools, tool_choice="none")
    assert client.count_tokens(Q, tools=tools, tool_choice="none") == with_tools.usage.prompt_tokens


def test_count_tokens_with_prompt_shaping_parameters_asks_tokenize(client: LLMClient) -> None:
    # A forced call or a strict schema cannot be counted with a one-token completion (no valid reply
    # fits one token); this library's /tokenize applies them and says so.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}]
    local = fake_client(REPLY, temperature=0)
    schema = {"type": "json_schema", "json_schema": {"name": "n", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}}}
    for shaping in ({"tools": tools, "tool_choice": "required"}, {"response_format": schema}):
        assert client.count_tokens(Q, **shaping) == local.count_tokens(Q, **shaping)  # type: ignore[arg-type]


def test_memory_over_http(client: LLMClient) -> None:
    client.enable_memory(max_tokens=200)
    client.chat.completions.create(messages=[{"role": "user", "content": "one"}])
    list(client.chat.completions.create(messages=[{"role": "user", "content": "two"}], stream=True))
    assert client.memory == [{"role": "user", "content": "one"}, {"role": "assistant", "content": REPLY},
                             {"role": "user", "content": "two"}, {"role": "assistant", "content": REPLY}]
    for i in range(10):  # the budget is counted by the server's tokenizer
        client.add_to_memory([{"role": "user", "content": f"message number {i}"}])
    assert client.count_tokens(client.memory) <= 200
    assert client.memory[-1] == {"role": "user", "content": "message number 9"}


def test_closing_a_stream_stops_the_server(server: RunningServer) -> None:
    backend = CountingBackend("z" * 500, delay=0.01)
    served = fake_client("z", backend=backend, asynchronous=True)
    with running_server(served) as slow, LLMClient(backend="openai", base_url=slow.base_url) as remote:
        stream = remote.chat.completions.create(messages=Q, stream=True)
        next(stream), next(stream)
        stream.close()
        deadline = time.monotonic() + 30
        import httpx

        while httpx.get(slow.url + "/health").json()["generating"] and time.monotonic() < deadline:
            time.sleep(0.05)
        settled = backend.forwards
        time.sleep(0.3)
        assert backend.forwards == settled and settled < 200


def test_503_is_retried_and_succeeds() -> None:
    backend = CountingBackend("slow", delay=0.05)
    served = fake_client("slow", backend=backend, asynchronous=True)
    with running_server(served, limits=ServerLimits(max_queue=0)) as busy:
        first = threading.Thread(target=lambda: LLMClient(backend="openai", base_url=busy.base_url)
                                 .chat.completions.create(messages=Q))
        first.start()
        time.sleep(0.1)  # the first request holds the only slot
        with pytest.raises(RemoteServerError) as refused:
            LLMClient("fake-model", backend="openai", base_url=busy.base_url,
                      max_retries=0).chat.completions.create(messages=Q)
        assert refused.value.status == 503
        patient = LLMClient("fake-model", backend="openai", base_url=busy.base_url, max_retries=5)
        assert patient.chat.completions.create(messages=Q).choices[0].message.content == "slow"
        first.join()


def test_settings() -> None:
    with pytest.raises(InvalidRequestError) as missing:
        LLMClient(backend="openai")
    assert missing.value.param == "base_url"
    with pytest.raises(InvalidRequestError):
        LLMClient(backend="openai", base_url="localhost:8000")
    with pytest.raises(InvalidRequestError) as local:
        LLMClient(base_url="http://127.0.0.1:1/v1")
    assert local.value.param == "base_url"
    with pytest.raises(InvalidRequestError):
        LLMClient(timeout=5)
    remote = LLMClient("m", backend="openai", base_url="http://127.0.0.1:1/v1", api_key="secret-value")
    assert "secret-value" not in repr(remote.settings)
    with pytest.raises(InvalidRequestError, match="no local engine"):
        _ = remote.engine


def test_environment(monkeypatch: pytest.MonkeyPatch, server: RunningServer) -> None:
    monkeypatch.setenv("LOCAL_LLM_KIT_BACKEND", "openai")
    monkeypatch.setenv("LOCAL_LLM_KIT_BASE_URL", server.base_url)
    monkeypatch.setenv("LOCAL_LLM_KIT_API_KEY", KEY)
    assert LLMClient().chat.completions.create(messages=Q).choices[0].message.content == REPLY


def test_extra_body(client: LLMClient) -> None:
    # One of our parameters: merged in and validated here, before sending.
    with pytest.raises(InvalidRequestError) as ours:
        client.chat.completions.create(messages=Q, extra_body={"temperature": 9})
    assert ours.value.param == "temperature"
    assert client.chat.completions.create(messages=Q, extra_body={"max_tokens": 3}).usage.completion_tokens == 3
    # Not one of ours (vLLM's top_k, say): sent as given; this server refuses it, naming it.
    with pytest.raises(InvalidRequestError) as theirs:
        client.chat.completions.create(messages=Q, extra_body={"top_k": 5})
    assert theirs.value.param == "top_k"


def test_our_own_parameters_reach_the_server(client: LLMClient, backend: CountingBackend) -> None:
    # prompt_lookup is ours, not OpenAI's: sent in the body, and our server honours it (it drafts
    # the reply from a prompt that contains it, verifying several tokens per forward pass).
    quoting = [{"role": "user", "content": f"Say: {REPLY}"}]
    for prompt_lookup, batched in ((False, False), (True, True)):
        backend.forward_calls.clear()
        reply = client.chat.completions.create(messages=quoting, prompt_lookup=prompt_lookup)
        assert reply.choices[0].message.content == REPLY
        assert (max(backend.forward_calls[1:]) > 1) is batched


@pytest.mark.parametrize(("name", "value"), [("store", True), ("metadata", {"a": "b"})])
def test_store_and_metadata_reach_the_server_which_decides(client: LLMClient, name: str, value: Any) -> None:
    # In-process both raise; over HTTP the server decides, and this library's refuses them the same way.
    with pytest.raises(InvalidRequestError) as info:
        client.chat.completions.create(messages=Q, **{name: value})
    assert info.value.param == name


def test_timeouts_raise_what_in_process_timeouts_raise() -> None:
    backend = CountingBackend("y" * 400, delay=0.01)
    served = fake_client("y", backend=backend, asynchronous=True)
    with running_server(served) as slow, LLMClient(backend="openai", base_url=slow.base_url) as remote:
        # the client's HTTP timeout, and the request's own deadline sent in the body (a 504 from the server)
        for options in ({"timeout": 0.3}, {"extra_body": {"timeout": 0.3}}):
            started = time.monotonic()
            with pytest.raises(GenerationTimeoutError):
                remote.chat.completions.create(messages=Q, **options)  # type: ignore[arg-type]
            assert time.monotonic() - started < 3.0
