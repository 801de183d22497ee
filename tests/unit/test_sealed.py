"""Sealed messages: memory's history, snapshotted once and unchangeable, read like plain dicts."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from typing import Any

import pytest

from local_llm_kit import encoding
from local_llm_kit.sealed import SealedMessage, snapshot
from local_llm_kit.testing import fake_client

CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]}

CHANGES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "setitem": lambda m: m.__setitem__("content", "edited"),
    "delitem": lambda m: m.__delitem__("content"),
    "clear": lambda m: m.clear(),
    "pop": lambda m: m.pop("content"),
    "popitem": lambda m: m.popitem(),
    "setdefault": lambda m: m.setdefault("name", "x"),
    "update": lambda m: m.update(content="edited"),
    "ior": lambda m: m.__ior__({"content": "edited"}),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_sealed_message_refuses_every_change(change: Callable[[dict[str, Any]], Any]) -> None:
    sealed = SealedMessage({"role": "user", "content": "hi"})
    before = sealed.snapshot
    with pytest.raises(TypeError, match="cannot be changed"):
        change(sealed)
    assert sealed == {"role": "user", "content": "hi"} and sealed.snapshot is before


@pytest.mark.parametrize("message", [{"role": "user", "content": "hi", "name": "ada"}, CALL],
                         ids=["text", "tool call"])
def test_a_sealed_message_reads_and_snapshots_like_the_plain_dict(message: dict[str, Any]) -> None:
    sealed = SealedMessage(message)
    assert sealed == message and dict(sealed) == message and json.dumps(sealed) == json.dumps(message)
    assert sealed.snapshot == snapshot(message) and snapshot(sealed) is sealed.snapshot
    assert isinstance(sealed.snapshot[1], int)


@pytest.mark.parametrize("make_copy", [copy.copy, copy.deepcopy, dict, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["copy", "deepcopy", "dict", "pickle"])
def test_copies_of_a_sealed_message_are_plain_dicts_that_change(make_copy: Callable[[Any], Any]) -> None:
    sealed = SealedMessage(CALL)
    copied = make_copy(sealed)
    assert type(copied) is dict and copied == CALL
    copied["content"] = "edited"
    assert sealed["content"] is None


def test_a_message_that_does_not_serialize_cannot_be_sealed() -> None:
    with pytest.raises(TypeError):
        SealedMessage({"role": "user", "content": ["not", {"json": object()}]})


def test_memory_keeps_sealed_copies_and_hands_out_plain_ones() -> None:
    client = fake_client("Fine.")
    client.enable_memory(max_tokens=10_000)
    asked = {"role": "user", "content": "Hello"}
    client.chat.completions.create(messages=[asked])
    asked["content"] = "changed by the caller afterwards"
    memory = client._memory
    assert memory is not None
    assert all(type(m) is SealedMessage for m in memory.snapshot())
    handed = client.memory
    assert all(type(m) is dict for m in handed)
    assert [m["content"] for m in handed] == ["Hello", "Fine."]
    handed[0]["content"] = "changed by the reader"
    assert [m["content"] for m in client.memory] == ["Hello", "Fine."]


def test_a_sealed_conversation_shares_memo_keys_with_its_plain_copy() -> None:
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, CALL,
             {"role": "tool", "tool_call_id": "call_1", "content": "2"}]
    sealed = [SealedMessage(m) for m in plain]
    a, b = encoding._Conversation.of(plain, None), encoding._Conversation.of(sealed, None)
    assert a is not None and b is not None
    for size in range(len(plain) + 1):
        assert a.key(size) == b.key(size) and hash(a.key(size)) == hash(b.key(size))
    # sealed and plain mixed, as memory's history and a caller's new message are
    mixed = encoding._Conversation.of([*sealed[:2], *plain[2:]], None)
    assert mixed is not None and mixed.key() == a.key()
    client = fake_client("ok")
    assert client.engine.encode(sealed) == client.engine.encode(plain)
