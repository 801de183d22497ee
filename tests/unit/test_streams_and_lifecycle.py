"""Streams advanced from any thread, abandoned streams, model ownership and unloading (issue 8, items 1-3).

All on the fake backend, whose forward pass raises if two generations ever run on its KV cache
at the same time and can be slowed down to make cancellation observable.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from local_llm_kit import AsyncLLMClient, LLMClient
from local_llm_kit.errors import ClientClosedError, GenerationTimeoutError, ModelUnloadedError
from local_llm_kit.streaming import QUEUE_CHUNKS, Stream
from local_llm_kit.testing import FakeBackend, fake_client

REPLY = "The quick brown fox jumps over the lazy dog."
MESSAGES = [{"role": "user", "content": "Say the sentence."}]


def _client(delay_s: float = 0.0, reply: str = REPLY) -> tuple[LLMClient, FakeBackend]:
    backend = FakeBackend(reply, delay_s=delay_s)
    client = fake_client(backend=backend)
    assert isinstance(client, LLMClient)
    return client, backend


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _wait_until(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_a_sync_stream_advanced_from_many_threads_completes_and_frees_the_model() -> None:
    client, _ = _client()
    stream = client.chat.completions.create(messages=MESSAGES, temperature=0, stream=True)
    chunks: list[Any] = []
    # Each chunk pulled by a different pool thread, as Starlette does with a sync iterator.
    with ThreadPoolExecutor(max_workers=4) as pool:
        while True:
            chunk = pool.submit(next, stream, None).result()
            if chunk is None:
                break
            chunks.append(chunk)
    assert _text(chunks) == REPLY
    assert not client.engine.lease.busy
    # Another caller is not blocked afterwards.
    reply = client.chat.completions.create(messages=MESSAGES, temperature=0)
    assert reply.choices[0].message.content == REPLY


def test_a_request_sent_while_a_stream_is_open_in_the_same_thread_does_not_deadlock() -> None:
    client, _ = _client()
    stream = client.chat.completions.create(messages=MESSAGES, temperature=0, stream=True)
    first = [next(stream), next(stream), next(stream)]
    # The stream holds the model; the new request borrows it once the stream has sat idle, and
    # the fake backend raises if both ever decode at once.
    other = client.chat.completions.create(messages=[{"role": "user", "content": "Again."}], temperature=0)
    assert other.choices[0].message.content == REPLY
    rest = list(stream)
    assert _text(first + rest) == REPLY  # the stream resumed on its own prefix, not the other's


def test_a_waiting_request_waits_for_a_busy_stream_instead_of_interleaving() -> None:
    client, _ = _client(delay_s=0.002)
    stream = client.chat.completions.create(messages=MESSAGES, temperature=0, stream=True)
    next(stream)
    finished_at: list[float] = []

    def other() -> None:
        client.chat.completions.create(messages=MESSAGES, temperature=0)
        finished_at.append(time.monotonic())

    thread = threading.Thread(target=other)
    thread.start()
    chunks = list(stream)  # consumed promptly: the other request must not get in between
    stream_ended_at = time.monotonic()
    thread.join(10)
    assert _text(chunks) == REPLY[len(""):]  # the first chunk is the role chunk
    assert finished_at and finished_at[0] > stream_ended_at


def test_a_dropped_sync_stream_gives_the_model_back_at_once() -> None:
    client, _ = _client()
    stream = client.chat.completions.create(messages=MESSAGES, temperature=0, stream=True)
    next(stream), next(stream)
    assert client.engine.lease.busy
    del stream
    assert not client.engine.lease.busy
    reply = client.chat.completions.create(messages=MESSAGES, temperature=0)
    assert reply.choices[0].message.content == REPLY


def test_closing_a_stream_from_another_thread_while_it_is_being_advanced_stops_it() -> None:
    client, backend = _client(delay_s=0.02, reply="x" * 500)
    stream = client.chat.completions.create(messages=MESSAGES, temperature=0, stream=True)
    chunks: list[Any] = []

    def consume() -> None:
        chunks.extend(stream)

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert _wait_until(lambda: len(chunks) > 3)
    stream.close()
    consumer.join(5)
    assert not consumer.is_alive()
    calls = len(backend.forward_calls)
    time.sleep(0.1)
    assert len(backend.forward_calls) == calls  # nothing decodes after close
    assert len(chunks) < 400
    assert not client.engine.lease.busy


def test_a_deadline_that_passes_while_a_chunk_is_computed_ends_the_stream_with_its_error() -> None:
    # The request's deadline and close() share the cancel flag; only close() may end a stream
    # quietly. (Found under load: a stream whose timeout fired mid-chunk just stopped, as if complete.)
    cancel = threading.Event()

    def source() -> Any:
        cancel.set()  # the deadline passes while this chunk is being computed
        yield "chunk"
        raise GenerationTimeoutError("the request did not finish within its timeout of 0.2 s")

    stream = Stream(source(), cancel=cancel)
    assert next(stream) == "chunk"
    with pytest.raises(GenerationTimeoutError):
        next(stream)


def test_a_stream_closed_early_is_not_remembered() -> None:
    client, _ = _client()
    client.enable_memory(500)
    with client.chat.completions.create(messages=MESSAGES, temperature=0, stream=True) as stream:
        next(stream)
    assert client.memory == []
    list(client.chat.completions.create(messages=MESSAGES, temperature=0, stream=True))
    assert [m["role"] for m in client.memory] == ["user", "assistant"]


async def test_an_async_stream_whose_consumer_stops_reading_stops_decoding() -> None:
    backend = FakeBackend("y" * 1000, delay_s=0.001)
    client = fake_client(backend=backend, asynchronous=True)
    assert isinstance(client, AsyncLLMClient)
    stream = await client.chat.completions.create(messages=MESSAGES, temperature=0, stream=True)
    await stream.__anext__()
    await asyncio.sleep(0.3)
    # Backpressure: the worker computed at most the queue's worth of chunks ahead.
    assert len(backend.forward_calls) <= QUEUE_CHUNKS + 3
    await stream.aclose()
    assert not client.engine.lease.busy


async def test_a_dropped_async_stream_stops_its_worker_and_frees_the_model() -> None:
    backend = FakeBackend("z" * 1000, delay_s=0.001)
    client = fake_client(backend=backend, asynchronous=True)
    assert isinstance(client, AsyncLLMClient)
    stream = await client.chat.completions.create(messages=MESSAGES, temperature=0, stream=True)
    await stream.__anext__()
    del stream
    gc.collect()
    assert await asyncio.to_thread(_wait_until, lambda: not client.engine.lease.busy, 2.0)
    calls = len(backend.forward_calls)
    await asyncio.sleep(0.1)
    assert len(backend.forward_calls) == calls
    reply = await client.chat.completions.create(messages=MESSAGES, temperature=0, max_tokens=3)
    assert reply.choices[0].message.content == "zzz"


async def test_cancelling_the_task_that_awaits_a_reply_stops_generation() -> None:
    backend = FakeBackend("w" * 1000, delay_s=0.005)
    client = fake_client(backend=backend, asynchronous=True)
    assert isinstance(client, AsyncLLMClient)
    task = asyncio.create_task(client.chat.completions.create(messages=MESSAGES, temperature=0))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(_wait_until, lambda: not client.engine.lease.busy, 2.0)
    calls = len(backend.forward_calls)
    await asyncio.sleep(0.1)
    assert len(backend.forward_calls) == calls


async def test_sixteen_async_streams_on_one_model_do_not_interleave() -> None:
    client = fake_client(reply=lambda prompt: prompt[-40:-23], asynchronous=True)
    assert isinstance(client, AsyncLLMClient)

    async def ask(i: int) -> str:
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": f"question number {i:04d}"}], temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    answers = await asyncio.gather(*(ask(i) for i in range(16)))
    serial = [(await client.chat.completions.create(
        messages=[{"role": "user", "content": f"question number {i:04d}"}], temperature=0)).choices[0].message.content
        for i in range(16)]
    assert answers == serial
    assert len(set(answers)) == 16


def test_unloading_stops_a_running_stream_with_a_clear_error() -> None:
    client, _ = _client(delay_s=0.01, reply="q" * 300)
    stream = client.chat.completions.create(messages=MESSAGES, temperature=0, stream=True)
    next(stream), next(stream)
    client.engine.close()
    with pytest.raises(ModelUnloadedError):
        list(stream)


def test_unloading_stops_a_running_non_streamed_request_at_its_next_token() -> None:
    """A non-streamed reply holds the model for its whole length; unloading waited for all of it
    (300 tokens here) and the request answered as if nothing had happened."""
    client, backend = _client(delay_s=0.01, reply="q" * 300)
    outcome: list[object] = []

    def ask() -> None:
        try:
            outcome.append(client.chat.completions.create(messages=MESSAGES, temperature=0))
        except ModelUnloadedError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=ask)
    worker.start()
    while len(backend.forward_calls) < 5:
        time.sleep(0.005)
    started = time.monotonic()
    client.engine.close()
    unloading = time.monotonic() - started
    worker.join(timeout=30)
    [result] = outcome
    assert isinstance(result, ModelUnloadedError), result
    assert len(backend.forward_calls) < 100, "it decoded on after the unload"
    assert unloading < 1.0, f"unloading waited {unloading:.2f} s for the reply"


def test_a_closed_client_refuses_requests_and_a_with_block_closes_it() -> None:
    client, _ = _client()
    with client as same:
        assert same is client
        assert client.chat.completions.create(messages=MESSAGES, temperature=0).choices[0].message.content == REPLY
    assert client.closed
    with pytest.raises(ClientClosedError):
        client.chat.completions.create(messages=MESSAGES)
    client.close()  # idempotent


def test_a_short_reply_that_also_occurs_in_an_earlier_message_is_spliced_where_the_reply_is() -> None:
    client, backend = _client(reply="Paris")
    engine = client.engine
    first = [{"role": "user", "content": "Is Paris or Rome the capital of France? Answer Paris or Rome."}]
    reply = client.chat.completions.create(messages=first, temperature=0).choices[0].message.content
    assert reply == "Paris"
    # Pretend the model had produced "Paris" as one (non-canonical) token sequence: the splice must
    # put those ids in the assistant span, not over the "Paris" of the user's question.
    odd_ids = [*b"Par", *b"is"]
    engine.remember_generation(engine.encode_prompt(first)[1], "Paris", odd_ids)
    conversation = [*first, {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "Sure?"}]
    ids = engine.encode(conversation)
    canonical = backend.tokenize(engine.render(conversation))
    assert len(ids) == len(canonical) and ids == canonical  # byte tokens: same ids, same positions
    text = engine.render(conversation)
    reply_at = text.index("<|im_start|>assistant\nParis") + len("<|im_start|>assistant\n")
    before = backend.tokenize(text[:reply_at])
    assert ids[: len(before)] == before
    assert ids[len(before): len(before) + 5] == odd_ids


def test_splicing_is_refused_when_the_template_rewrites_the_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    template = ("{% for m in messages %}{{ m['role'] }}: {{ (m['content'] or '') | upper }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    backend = FakeBackend("ok", chat_template=template)
    client = fake_client(backend=backend)
    engine = client.engine
    engine.remember_generation(engine.encode_prompt([{"role": "user", "content": "hi"}])[1], "ok", list(b"ok"))
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert engine.encode(conversation) == backend.tokenize(engine.render(conversation))
