"""Property-based fuzzing of ``chat.completions.create()`` (issue 8, "The reliability suite").

Every generated request must end in one of two ways: a response (or a stream of chunks) that
openai-python's own types accept and that keeps the API's invariants, or an
:class:`InvalidRequestError` / :class:`TokenLimitError` whose ``param`` names the problem.
Any other exception, a hang or a crash fails the run. Afterwards the model still answers a fixed
greedy request as it did before (and as a freshly loaded model does), nothing holds it, and a
conversation memory was left untouched by every request that failed.

The runs are derandomized (``derandomize=True``, no example database), so CI sees the same
requests every time; the tallies of outcomes are logged (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from local_llm_kit import LLMClient
from local_llm_kit.errors import InvalidRequestError, ModelNotFoundError
from local_llm_kit.streaming import Stream
from local_llm_kit.testing import FakeBackend, fake_client
from tests.reliability.strategies import requests
from tests.reliability.support import (
    GREEDY_QUESTION,
    check_chunks,
    check_error,
    check_response,
    greedy_answer,
)

logger = logging.getLogger(__name__)

FAKE_EXAMPLES = int(os.environ.get("LLK_FUZZ_EXAMPLES", "1200"))
REAL_EXAMPLES = 60
FINISH_REASONS = {"stop", "length", "tool_calls", "function_call"}


def _fingerprint_reply(prompt: str) -> str:
    """The fake model's answer depends on the whole prompt it saw, so a stale KV cache shows."""
    return f"Answer {zlib.crc32(prompt.encode()) % 10000}."


def _fuzz_settings(examples: int) -> Any:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def _expected_choices(params: dict[str, Any]) -> int:
    return int(params.get("n") or 1)


def _check_json_outputs(params: dict[str, Any], choices: list[tuple[str | None, str | None, Any]]) -> None:
    """A reply that finished on its own in JSON mode is JSON; tool calls carry JSON arguments."""
    fmt = params.get("response_format")
    json_mode = isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")
    for content, reason, tool_calls in choices:
        if reason == "stop" and json_mode and content is not None:
            json.loads(content)
        for call in tool_calls or ():
            json.loads(call.function.arguments)


def _check_response(client: LLMClient, params: dict[str, Any], response: Any) -> None:
    parsed = check_response(response)
    assert len(parsed.choices) == _expected_choices(params)
    assert [c.index for c in parsed.choices] == list(range(len(parsed.choices)))
    assert all(c.finish_reason in FINISH_REASONS for c in parsed.choices)
    usage = parsed.usage
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    limit = params.get("max_tokens") or params.get("max_completion_tokens")
    if isinstance(limit, int):
        assert usage.completion_tokens <= limit * len(parsed.choices)
    _check_json_outputs(params, [(c.message.content, c.finish_reason, c.message.tool_calls)
                                 for c in parsed.choices])
    if not client.memory_enabled:
        # count_tokens takes create()'s arguments and must count exactly the prompt it feeds.
        counted = {k: v for k, v in params.items() if k not in ("stream", "stream_options", "timeout")}
        assert client.count_tokens(**counted) == usage.prompt_tokens


def _check_stream(params: dict[str, Any], chunks: list[Any]) -> None:
    parsed = check_chunks(chunks)
    n = _expected_choices(params)
    with_choices = [c for c in parsed if c.choices]
    assert len({c.id for c in parsed}) == 1
    finishes: dict[int, str] = {}
    texts: dict[int, list[str]] = {}
    calls: dict[int, Any] = {}
    for chunk in with_choices:
        for choice in chunk.choices:
            assert choice.index not in finishes, "a chunk after the choice's finish_reason"
            texts.setdefault(choice.index, []).append(choice.delta.content or "")
            if choice.delta.tool_calls:
                calls.setdefault(choice.index, []).extend(choice.delta.tool_calls)
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
    assert sorted(finishes) == list(range(n)), f"choices finished: {sorted(finishes)}, expected {n}"
    assert set(finishes.values()) <= FINISH_REASONS
    options = params.get("stream_options") or {}
    if options.get("include_usage"):
        last = parsed[-1]
        assert not last.choices and last.usage is not None
    else:
        assert all(c.usage is None for c in parsed)
    _check_json_outputs(params, [("".join(texts.get(i, [])), finishes[i], None) for i in range(n)])


def run_request(client: LLMClient, params: dict[str, Any]) -> str:
    """Send one request; check its outcome; return the outcome's kind for the tallies."""
    memory_before = client.memory
    kind: str
    try:
        result = client.chat.completions.create(**params)
        if isinstance(result, Stream):
            chunks = list(result)
            _check_stream(params, chunks)
            kind = "stream"
        else:
            _check_response(client, params, result)
            kind = "response"
    except ModelNotFoundError as exc:
        # model= names weights that are not there: the documented error, which lists what was searched.
        assert isinstance(params.get("model"), str) and exc.searched, exc
        kind = "ModelNotFoundError"
    except InvalidRequestError as exc:
        kind = check_error(exc)
        assert client.memory == memory_before, "a failed request changed the memory"
    assert not client.engine.lease.busy, "a finished request still holds the model"
    return kind


def _fuzz(clients: list[LLMClient], examples: int, *, real: bool) -> Counter[str]:
    tally: Counter[str] = Counter()

    @_fuzz_settings(examples)
    @given(params=requests(real=real))
    def one(params: dict[str, Any]) -> None:
        # The memory client gets every fourth request (hypothesis decides which, reproducibly).
        client = clients[zlib.crc32(repr(sorted(params)).encode()) % 4 == 0]
        tally[run_request(client, params)] += 1

    one()
    return tally


def _memory_client(client: LLMClient) -> None:
    client.enable_memory(300)
    client.add_to_memory([{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hi Ada."}])


def test_fuzzing_create_on_the_fake_backend() -> None:
    backend = FakeBackend(_fingerprint_reply)
    plain = fake_client(backend=backend)
    remembering = fake_client(backend=backend)
    assert isinstance(plain, LLMClient) and isinstance(remembering, LLMClient)
    remembering._engine = plain.engine  # a second client over the same engine, with memory
    _memory_client(remembering)
    before = greedy_answer(plain)
    started = time.perf_counter()
    tally = _fuzz([plain, remembering], FAKE_EXAMPLES, real=False)
    elapsed = time.perf_counter() - started
    logger.warning("fuzz (fake backend): %d requests in %.1f s: %s", sum(tally.values()), elapsed, dict(tally))
    print(f"\nfuzz (fake backend): {sum(tally.values())} requests in {elapsed:.1f} s: {dict(tally)}")
    assert sum(tally.values()) >= 1000
    # Both outcomes are exercised in earnest, not one of them only.
    assert tally["response"] + tally["stream"] >= 250 and tally["InvalidRequestError"] >= 250
    assert tally["TokenLimitError"] >= 10
    assert greedy_answer(plain) == before == _fingerprint_reply(plain.engine.render(GREEDY_QUESTION))
    assert not plain.engine.lease.busy
    # The memory still holds valid messages, the first exchange included or trimmed in order.
    history = remembering.memory
    assert history and all(m["role"] in ("system", "user", "assistant", "tool", "function") for m in history)
    assert greedy_answer(remembering)


@pytest.mark.slow
def test_fuzzing_create_on_the_real_model(smol: LLMClient, smol_reference: str) -> None:
    before = greedy_answer(smol)
    assert before == smol_reference
    remembering = LLMClient(smol.resolved_model.name, temperature=0, cache_dir=smol.settings.cache_dir)
    remembering._resolved, remembering._engine = smol.resolved_model, smol.engine
    _memory_client(remembering)
    started = time.perf_counter()
    tally = _fuzz([smol, remembering], REAL_EXAMPLES, real=True)
    elapsed = time.perf_counter() - started
    print(f"\nfuzz (SmolLM2, llama.cpp): {sum(tally.values())} requests in {elapsed:.1f} s: {dict(tally)}")
    assert sum(tally.values()) >= REAL_EXAMPLES
    assert tally["response"] + tally["stream"] >= 10 and tally["InvalidRequestError"] >= 10
    assert not smol.engine.lease.busy
    assert greedy_answer(smol) == before
    assert remembering.memory
