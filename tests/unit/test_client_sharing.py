"""``LLMClient.as_async()`` / ``AsyncLLMClient.as_sync()``: one model, one conversation, two interfaces.

The rule tested here: the two clients share the settings, the loaded engine and the memory; each
closes only itself, and the engine is let go of when the last of them closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_llm_kit import AsyncLLMClient, ClientClosedError, LLMClient
from local_llm_kit.engine import loaded_engines
from local_llm_kit.testing import FakeBackend, fake_client

Q = [{"role": "user", "content": "first question"}]


def _questions(prompt: str) -> str:
    """The fake model's reply: how many user messages its prompt holds."""
    return f"{prompt.count('user')} asked"


def sync_client(reply: str = "Hello!") -> LLMClient:
    client = fake_client(reply, temperature=0)
    assert isinstance(client, LLMClient)
    return client


async def test_as_async_shares_settings_and_the_loaded_engine() -> None:
    client = sync_client()
    aclient = client.as_async()
    assert isinstance(aclient, AsyncLLMClient)
    assert aclient.settings == client.settings and aclient.model == client.model
    assert aclient.engine is client.engine
    reply = await aclient.chat.completions.create(messages=Q)
    assert reply.choices[0].message.content == "Hello!"
    back = aclient.as_sync()
    assert isinstance(back, LLMClient) and back.engine is client.engine


async def test_memory_is_one_conversation() -> None:
    client = fake_client(_questions, temperature=0)
    assert isinstance(client, LLMClient)
    aclient = client.as_async()
    client.enable_memory(500)
    assert aclient.memory_enabled
    await aclient.chat.completions.create(messages=Q)
    assert client.memory == [*Q, {"role": "assistant", "content": "1 asked"}]
    later = client.chat.completions.create(messages=[{"role": "user", "content": "and then?"}])
    assert later.choices[0].message.content == "2 asked"  # the async client's turn was sent
    aclient.clear_memory()
    assert client.memory == []
    client.disable_memory()
    assert not aclient.memory_enabled


async def test_closing_one_leaves_the_other_working_and_the_last_frees_the_engine() -> None:
    client = sync_client()
    aclient = client.as_async()
    engine = client.engine
    client.close()
    client.close()  # idempotent: does not count twice
    with pytest.raises(ClientClosedError):
        client.chat.completions.create(messages=Q)
    with pytest.raises(ClientClosedError):
        client.as_async()
    assert not engine.closed
    reply = await aclient.chat.completions.create(messages=Q)
    assert reply.choices[0].message.content == "Hello!"
    await aclient.close()
    assert engine.closed


async def test_memory_counts_with_an_open_client_when_the_one_that_enabled_it_is_closed() -> None:
    client = sync_client()
    aclient = client.as_async()
    client.enable_memory(500)
    client.close()
    aclient.add_to_memory([*Q, {"role": "assistant", "content": "hi"}])
    await aclient.chat.completions.create(messages=[{"role": "user", "content": "again"}])
    assert len(aclient.memory) == 4
    await aclient.close()
    with pytest.raises(ClientClosedError):  # nobody is left to count with
        aclient.add_to_memory(Q)


@pytest.fixture()
def weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A model file that loads as a FakeBackend through the shared engine registry."""
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(12))
    monkeypatch.setattr("local_llm_kit.engine.create_backend", lambda name, where, options: FakeBackend("hi"))
    yield path
    for engine in loaded_engines():
        if engine.model.path == path:
            engine.close()


def test_the_shared_engine_is_held_once_among_other_clients_of_the_same_weights(weights: Path) -> None:
    client = LLMClient(model_path=str(weights), temperature=0)
    other = LLMClient(model_path=str(weights), temperature=0)  # an unrelated client of the same weights
    aclient = client.as_async()
    engine = client.engine
    assert other.engine is engine and aclient.engine is engine
    client.close()
    assert engine in loaded_engines()  # the async client holds it
    aclient.as_sync().close()  # a third sibling, closed: the async one still holds it
    assert engine in loaded_engines()
    assert aclient.engine is engine
    other.close()
    assert engine in loaded_engines() and not engine.closed  # still held by the async client
    asyncio.run(aclient.close())  # the last holder: closing it unloads the model
    assert engine.closed and engine not in loaded_engines()


def test_a_sibling_made_before_loading_loads_the_same_engine_once(weights: Path) -> None:
    client = LLMClient(model_path=str(weights), temperature=0)
    aclient = client.as_async()
    assert aclient.engine is client.engine
    engine = client.engine
    client.close()
    assert not engine.closed
    aclient.as_sync().close()
    asyncio.run(aclient.close())
    assert engine.closed


async def test_a_remote_client_keeps_server_key_timeout_and_retries() -> None:
    pytest.importorskip("uvicorn", reason="needs the 'server' extra")
    from tests.server.conftest import running_server

    served = fake_client("over HTTP", asynchronous=True, temperature=0)
    assert isinstance(served, AsyncLLMClient)
    with running_server(served, api_key="sharing-key") as server:
        client = LLMClient(backend="openai", base_url=server.base_url, api_key="sharing-key", timeout=30,
                           max_retries=1, temperature=0)
        aclient = client.as_async()
        assert aclient.settings == client.settings
        assert aclient._remote is not None and client._remote is not None and aclient._remote is not client._remote
        assert (aclient._remote.timeout, aclient._remote.max_retries) == (30.0, 1)
        client.enable_memory(300)
        reply = await aclient.chat.completions.create(messages=Q)  # the key was carried over
        assert reply.choices[0].message.content == "over HTTP"
        assert client.memory == [*Q, {"role": "assistant", "content": "over HTTP"}]
        client.close()  # its connections only
        again = await aclient.chat.completions.create(messages=[{"role": "user", "content": "again"}])
        assert again.choices[0].message.content == "over HTTP"
        assert len(aclient.memory) == 4
        await aclient.close()
