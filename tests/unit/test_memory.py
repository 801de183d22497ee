"""Conversation memory on the fake backend: semantics, trimming, persistence, failures."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from local_llm_kit import InvalidRequestError, LLMClient, TokenLimitError
from local_llm_kit.memory import split_turns
from local_llm_kit.testing import FakeBackend, fake_client


def echo(prompt: str) -> str:
    """The fake model answers with the number of user turns it was shown."""
    return f"seen {prompt.count('<|im_start|>user')} user turns"


def make(n_ctx: int = 2048) -> LLMClient:
    client = fake_client(backend=FakeBackend(echo, n_ctx=n_ctx))
    assert isinstance(client, LLMClient)
    return client


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_memory_carries_the_conversation() -> None:
    client = make()
    client.enable_memory(max_tokens=1000)
    client.chat.completions.create(messages=[{"role": "system", "content": "Be brief."}, user("one")])
    second = client.chat.completions.create(messages=[user("two")])
    assert second.choices[0].message.content == "seen 2 user turns"
    assert [m["role"] for m in client.memory] == ["system", "user", "assistant", "user", "assistant"]
    assert client.memory[2]["content"] == "seen 1 user turns"
    # the prompt really contained the history: its count equals the remembered messages' count
    assert second.usage.prompt_tokens == client.count_tokens(client.memory[:-1])


def test_without_memory_nothing_is_remembered() -> None:
    client = make()
    client.chat.completions.create(messages=[user("one")])
    assert client.memory == [] and not client.memory_enabled
    assert client.chat.completions.create(messages=[user("two")]).choices[0].message.content == "seen 1 user turns"


def test_streamed_replies_are_remembered_only_when_complete() -> None:
    client = make()
    client.enable_memory()
    stream = client.chat.completions.create(messages=[user("one")], stream=True)
    next(stream), next(stream)
    stream.close()
    assert client.memory == []
    list(client.chat.completions.create(messages=[user("one")], stream=True))
    assert [m["content"] for m in client.memory] == ["one", "seen 1 user turns"]


def test_a_failing_call_leaves_memory_unchanged() -> None:
    client = make(n_ctx=200)
    client.enable_memory()
    client.add_to_memory([user("hello"), {"role": "assistant", "content": "hi"}])
    before = client.memory
    with pytest.raises(InvalidRequestError):
        client.chat.completions.create(messages=[user("x")], temperature=9)
    with pytest.raises(TokenLimitError):
        client.chat.completions.create(messages=[user("y" * 500)])
    assert client.memory == before


def test_trimming_keeps_the_system_message_and_drops_oldest_turns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="local_llm_kit.memory")
    client = make()
    client.enable_memory(max_tokens=120)
    client.add_to_memory([{"role": "system", "content": "S"}])
    for i in range(6):
        client.add_to_memory([user(f"question {i}"), {"role": "assistant", "content": f"answer {i}"}])
    remembered = client.memory
    assert remembered[0] == {"role": "system", "content": "S"}
    assert client.count_tokens(remembered) <= 120
    assert remembered[-1]["content"] == "answer 5"
    assert "question 0" not in [m["content"] for m in remembered]
    assert "trimmed" in caplog.text


def test_tool_calls_stay_with_their_results() -> None:
    client = make()
    client.enable_memory(max_tokens=150)
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turn = [user("use the tool"), {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"}, {"role": "assistant", "content": "42"}]
    client.add_to_memory(turn)
    client.add_to_memory([user("later"), {"role": "assistant", "content": "ok"}])
    client.add_to_memory([user("even later"), {"role": "assistant", "content": "fine"}])
    roles = [m["role"] for m in client.memory]
    # either the whole tool turn is there or none of it
    assert ("tool" in roles) == ("use the tool" in [m["content"] for m in client.memory])
    for i, m in enumerate(client.memory):
        if m["role"] == "tool":
            assert client.memory[i - 1].get("tool_calls")


def test_split_turns() -> None:
    system, turns = split_turns([{"role": "system", "content": "s"}, user("a"),
                                 {"role": "assistant", "content": "b"}, user("c")])
    assert len(system) == 1 and [len(t) for t in turns] == [2, 1]


def test_history_is_trimmed_further_to_fit_the_context() -> None:
    client = make(n_ctx=160)
    client.enable_memory(max_tokens=10_000)
    for i in range(5):
        client.add_to_memory([user(f"question number {i}"), {"role": "assistant", "content": f"answer {i}"}])
    response = client.chat.completions.create(messages=[user("now")], max_tokens=30)
    assert response.usage.prompt_tokens + 30 <= 160
    assert response.choices[0].message.content.startswith("seen")  # type: ignore[union-attr]


def test_a_new_message_that_cannot_fit_raises() -> None:
    client = make(n_ctx=100)
    client.enable_memory()
    with pytest.raises(TokenLimitError):
        client.chat.completions.create(messages=[user("z" * 300)])


def test_a_new_system_message_replaces_the_remembered_one() -> None:
    client = make()
    client.enable_memory()
    client.chat.completions.create(messages=[{"role": "system", "content": "old"}, user("a")])
    client.chat.completions.create(messages=[{"role": "system", "content": "new"}, user("b")])
    systems = [m for m in client.memory if m["role"] == "system"]
    assert systems == [{"role": "system", "content": "new"}] and client.memory[0] == systems[0]


def test_add_clear_save_load_round_trip(tmp_path: Path) -> None:
    client = make()
    with pytest.raises(InvalidRequestError, match="enable_memory"):
        client.add_to_memory([user("x")])
    client.enable_memory(max_tokens=500)
    client.add_to_memory([user("héllo"), {"role": "assistant", "content": "wörld"}])
    path = tmp_path / "memory.json"
    client.save_memory(path)
    assert json.loads(path.read_text(encoding="utf-8"))["max_tokens"] == 500
    other = make()
    other.load_memory(path)
    assert other.memory == client.memory and other.memory_enabled
    client.clear_memory()
    assert client.memory == [] and client.memory_enabled
    client.disable_memory()
    assert not client.memory_enabled
    path.write_text("{not json")
    with pytest.raises(InvalidRequestError):
        other.load_memory(path)
    assert len(other.memory) == 2
    with pytest.raises(InvalidRequestError):
        other.add_to_memory([{"role": "wizard", "content": "x"}])
    assert len(other.memory) == 2


def test_memory_belongs_to_its_client_and_threads_are_safe() -> None:
    backend = FakeBackend(echo)
    clients = [fake_client(backend=backend) for _ in range(4)]
    # one shared engine, as clients of the same weights share one loaded model
    for c in clients[1:]:
        c._engine = clients[0]._engine  # type: ignore[attr-defined]
    for c in clients:
        c.enable_memory()
    errors: list[BaseException] = []

    def chat(c: LLMClient) -> None:
        try:
            for i in range(3):
                reply = c.chat.completions.create(messages=[user(f"m{i}")])
                assert reply.choices[0].message.content == f"seen {i + 1} user turns"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=chat, args=(c,)) for c in clients]  # type: ignore[arg-type]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(len(c.memory) == 6 for c in clients)


def test_generated_ids_are_reused_next_turn() -> None:
    backend = FakeBackend("Reply text")
    client = fake_client(backend=backend)
    client.enable_memory()
    client.chat.completions.create(messages=[user("one")])
    backend.forward_calls.clear()
    second = client.chat.completions.create(messages=[user("two")])
    # the whole first turn is a cache hit: only the new turn's tokens are evaluated
    new_turn = len(backend.tokenize("<|im_end|>\n<|im_start|>user\ntwo<|im_end|>\n<|im_start|>assistant\n"))
    assert backend.forward_calls[0] <= new_turn + 1
    assert second.usage.prompt_tokens == client.count_tokens(client.memory[:-1])


@pytest.mark.parametrize("turns", [3, 8, 40])
def test_the_fewest_turns_are_left_out_to_fit_the_context(turns: int) -> None:
    client = make(n_ctx=400)
    client.enable_memory(max_tokens=100_000)
    history = [m for i in range(turns) for m in (user(f"question number {i}"),
                                                 {"role": "assistant", "content": f"answer {i}"})]
    client.add_to_memory(history)
    engine = client.engine
    sent: list[int] = []
    inner = engine.encode

    def recording(messages: Any, **kwargs: Any) -> list[int]:
        sent.append(len(messages))
        return inner(messages, **kwargs)

    engine.encode = recording  # type: ignore[method-assign]
    response = client.chat.completions.create(messages=[user("now")], max_tokens=30)
    kept = response.usage.prompt_tokens  # the prompt actually sent
    fitting = [drop for drop in range(turns + 1)
               if len(inner([*history[2 * drop:], user("now")])) + 30 <= 400]
    assert fitting, "the newest message alone fits"
    assert kept == len(inner([*history[2 * fitting[0]:], user("now")]))  # no more turns left out than needed
    assert len(sent) <= 2 + (turns + 1).bit_length() + 1  # bisection, not one try per turn
