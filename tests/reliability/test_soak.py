"""Soak (issue 8, "The reliability suite"): hundreds of requests, and the process does not grow.

A mix of what a long-running server sends (plain, streamed, async, with memory that trims,
JSON mode, streams closed early, requests refused) runs after a warm-up; the resident set size
is measured (``/proc/self/status``) after the warm-up and at the end, with a garbage collection
before each reading. Growth must stay below a stated bound, threads must not pile up, and the
model must still answer as before.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest

from local_llm_kit import AsyncLLMClient, LLMClient
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.testing import FakeBackend, fake_client
from tests.reliability.support import MODEL, greedy_answer, rss_bytes

MIB = 1024 * 1024
FAKE_REQUESTS = 1000
REAL_REQUESTS = 60
FAKE_GROWTH_BOUND = 16 * MIB
REAL_GROWTH_BOUND = 32 * MIB


def _one(client: LLMClient, i: int) -> None:
    """Request number ``i`` of the mix (deterministic)."""
    kind = i % 8
    messages = [{"role": "user", "content": f"Request {i}: tell me something."}]
    if kind == 0:
        client.chat.completions.create(messages=messages, max_tokens=8)
    elif kind == 1:
        list(client.chat.completions.create(messages=messages, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    elif kind == 2:  # a stream closed early
        with client.chat.completions.create(messages=messages, max_tokens=8, stream=True) as stream:
            next(stream)
    elif kind == 3:  # dropped without close
        stream = client.chat.completions.create(messages=messages, max_tokens=8, stream=True)
        next(stream)
        del stream
    elif kind == 4:
        client.chat.completions.create(messages=messages, max_tokens=8, response_format={"type": "json_object"})
    elif kind == 5:
        try:
            client.chat.completions.create(messages=messages, max_tokens=0)
        except InvalidRequestError:
            pass
        else:
            raise AssertionError("max_tokens=0 was accepted")
    elif kind == 6:
        client.chat.completions.create(messages=messages, max_tokens=8, n=2, temperature=0.8, seed=i)
    else:
        client.chat.completions.create(messages=messages, max_tokens=8, logprobs=True, top_logprobs=2)


async def _one_async(client: AsyncLLMClient, i: int) -> None:
    messages = [{"role": "user", "content": f"Async request {i}."}]
    if i % 2:
        await client.chat.completions.create(messages=messages, max_tokens=8)
    else:
        stream = await client.chat.completions.create(messages=messages, max_tokens=8, stream=True)
        async for _ in stream:
            pass


def _soak(plain: LLMClient, remembering: LLMClient, aclient: AsyncLLMClient, n: int) -> None:
    async def run_async(start: int, count: int) -> None:
        for i in range(start, start + count):
            await _one_async(aclient, i)

    for i in range(n):
        if i % 10 == 9:
            asyncio.run(run_async(i, 1))
        else:
            _one(remembering if i % 3 == 0 else plain, i)


def _measure(plain: LLMClient, remembering: LLMClient, aclient: AsyncLLMClient, n: int) -> tuple[int, int, float]:
    _soak(plain, remembering, aclient, 20)  # warm-up: caches, arenas, compiled grammars
    gc.collect()
    threads_before = threading.active_count()
    before = rss_bytes()
    started = time.perf_counter()
    _soak(plain, remembering, aclient, n)
    elapsed = time.perf_counter() - started
    gc.collect()
    after = rss_bytes()
    assert threading.active_count() <= threads_before + 1  # no worker threads left behind
    assert not plain.engine.lease.busy
    return before, after, elapsed


def _clients(plain: LLMClient) -> tuple[LLMClient, AsyncLLMClient]:
    remembering = LLMClient(plain.resolved_model.name, temperature=0, cache_dir=plain.settings.cache_dir)
    aclient = AsyncLLMClient(plain.resolved_model.name, temperature=0, cache_dir=plain.settings.cache_dir)
    for client in (remembering, aclient):
        client._resolved, client._engine = plain.resolved_model, plain.engine
    remembering.enable_memory(400)  # small: the memory trims itself all along
    return remembering, aclient


def test_soak_on_the_fake_backend_keeps_memory_flat() -> None:
    plain = fake_client(backend=FakeBackend("A steady reply of moderate length."))
    assert isinstance(plain, LLMClient)
    remembering, aclient = _clients(plain)
    answer = greedy_answer(plain)
    before, after, elapsed = _measure(plain, remembering, aclient, FAKE_REQUESTS)
    print(f"\nsoak (fake backend): {FAKE_REQUESTS} requests in {elapsed:.1f} s, "
          f"RSS {before / MIB:.1f} -> {after / MIB:.1f} MiB ({(after - before) / MIB:+.1f} MiB)")
    assert after - before < FAKE_GROWTH_BOUND
    assert greedy_answer(plain) == answer
    assert len(remembering.memory) > 0 and sum(len(m["content"] or "") for m in remembering.memory) < 4000


@pytest.mark.slow
def test_soak_on_the_real_model_keeps_memory_flat(smol: LLMClient, smol_reference: str) -> None:
    plain = LLMClient(MODEL, backend="llama.cpp", temperature=0, cache_dir=smol.settings.cache_dir)
    plain._resolved, plain._engine = smol.resolved_model, smol.engine
    remembering, aclient = _clients(plain)
    before, after, elapsed = _measure(plain, remembering, aclient, REAL_REQUESTS)
    print(f"\nsoak (SmolLM2, llama.cpp): {REAL_REQUESTS} requests in {elapsed:.1f} s, "
          f"RSS {before / MIB:.1f} -> {after / MIB:.1f} MiB ({(after - before) / MIB:+.1f} MiB)")
    assert after - before < REAL_GROWTH_BOUND
    assert greedy_answer(smol) == smol_reference
    assert remembering.memory
