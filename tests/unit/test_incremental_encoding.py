"""Incremental prompt encoding on the fake backend: same ids as a whole encode, cost of the new turn only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from local_llm_kit import LLMClient
from local_llm_kit.engine import Engine
from local_llm_kit.testing import FakeBackend, fake_client


class CountingBackend(FakeBackend):
    """Records how many characters each tokenize call was given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokenized: list[int] = []

    def tokenize(self, text: str) -> list[int]:
        self.tokenized.append(len(text))
        return super().tokenize(text)


def whole_encode(engine: Engine, messages: Sequence[dict[str, Any]]) -> list[int]:
    """What encode() gives with segmenting off and nothing memoized."""
    boundaries, segments = engine._boundaries, dict(engine._segments)
    engine._boundaries = ()
    engine._segments.clear()
    try:
        return engine.encode(messages)
    finally:
        engine._boundaries = boundaries
        engine._segments.update(segments)


def chat(client: LLMClient, turns: int) -> list[list[dict[str, Any]]]:
    """A conversation with memory on; returns the prompt (history + new message) of every turn."""
    client.enable_memory(max_tokens=100_000)
    prompts = []
    for i in range(turns):
        new = {"role": "user", "content": f"Question {i}: tell me more about item {i} <3 ünïcode."}
        prompts.append([*client.memory, new])
        client.chat.completions.create(messages=[new])
    return prompts


def test_incremental_ids_equal_a_whole_encode_over_a_conversation_with_memory() -> None:
    client = fake_client(lambda prompt: f"Reply {prompt.count('Question')}: fine.<|im_end|> trailing? no")
    engine = client.engine
    assert engine._boundaries  # the fake tokenizer's end-of-turn tokens
    prompts = chat(client, 12)
    for messages in prompts:
        assert engine.encode(messages) == whole_encode(engine, messages)
    assert engine._segment_checks == 0 and engine._boundaries  # every check passed, segmenting stays on


def test_a_warm_turn_tokenizes_only_what_is_new() -> None:
    backend = CountingBackend("A fairly long reply that becomes part of the history. " * 3)
    client = fake_client(backend=backend)
    chat(client, 10)  # past the first checks against whole tokenizations
    assert client.engine._segment_checks == 0
    history_chars = len(client.engine.render(client.memory))
    backend.tokenized.clear()
    client.chat.completions.create(messages=[{"role": "user", "content": "One more question."}])
    # the prompt and the memory's count after the reply: each only the new turn, not the history
    assert sum(backend.tokenized) < 200 < history_chars / 10


def test_a_tokenizer_that_breaks_segmenting_is_tokenized_whole(caplog: pytest.LogCaptureFixture) -> None:
    class StripsBeforeEndOfTurn(FakeBackend):
        def tokenize(self, text: str) -> list[int]:  # like an added token with lstrip=True
            ids = super().tokenize(text)
            out: list[int] = []
            for token in ids:
                if token == self.END_OF_TURN:
                    while out and out[-1] == ord(" "):
                        out.pop()
                out.append(token)
            return out

    client = fake_client(backend=StripsBeforeEndOfTurn("ok "))
    engine = client.engine
    messages = [{"role": "user", "content": "trailing space "}, {"role": "assistant", "content": "x "},
                {"role": "user", "content": "again "}]
    with caplog.at_level("WARNING"):
        ids = engine.encode(messages)
    assert ids == engine.backend.tokenize(engine.render(messages))
    assert engine._boundaries == () and "tokenizing whole" in caplog.text
