"""The multi-slot prefix cache on the fake backend: selection, eviction, borrowing, load options."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from local_llm_kit import InvalidRequestError, LLMClient
from local_llm_kit.backends.base import KV_BUDGET_BYTES, SlotView, default_kv_slots
from local_llm_kit.config import resolve_settings
from local_llm_kit.lease import BORROW_AFTER_S
from local_llm_kit.slots import SlotTable, choose_slot, common_prefix_length
from local_llm_kit.testing import FakeBackend, fake_client

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def test_common_prefix_length_finds_the_first_difference_wherever_it_lies() -> None:
    history = list(range(1000, 5000))  # spans the growing slices several times
    for at in [0, 1, 63, 64, 65, 575, 576, 577, 3999]:
        other = [*history[:at], -1, *history[at + 1:]]
        assert common_prefix_length(history, other) == at
        assert common_prefix_length(tuple(other), history) == at  # any sequences, either order
    assert common_prefix_length(history, history[:2500]) == 2500 == common_prefix_length(history[:2500], history)
    assert common_prefix_length(history, history) == 4000
    assert common_prefix_length([], history) == 0 == common_prefix_length(history, [])


def conversation(name: str, turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [SYSTEM]
    for i in range(turns):
        messages += [{"role": "user", "content": f"{name} question {i}: " + "words " * 20},
                     {"role": "assistant", "content": f"{name} answer {i}."}]
    return messages


def ask(client: LLMClient, history: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """One turn: returns the history with the question and the reply appended."""
    messages = [*history, {"role": "user", "content": text}]
    reply = client.chat.completions.create(messages=messages).choices[0].message.content
    return [*messages, {"role": "assistant", "content": reply}]


# -- the policy -----------------------------------------------------------------------------------

def test_a_continuation_takes_the_slot_holding_its_history() -> None:
    # slot 0 served [1, 2, 3] and generated 4, 5; slot 1 served [1, 2, 9]
    slots = [[1, 2, 3, 4, 5], [1, 2, 9, 9], []]
    served = [3, 3, 0]
    assert choose_slot([1, 2, 3, 4, 5, 6, 7], slots, [3, 2, 0], [0, 1, 2], served) == 0
    assert choose_slot([1, 2, 9, 9, 8], slots, [3, 2, 0], [0, 1, 2], served) == 1
    # a reply re-tokenized differently diverges after the prompt it served: still that slot
    assert choose_slot([1, 2, 3, 4, 6, 6], slots, [3, 2, 0], [0, 1, 2], served) == 0
    # the same prompt again (another choice, a retry) reuses it too
    assert choose_slot([1, 2, 3], slots, [3, 2, 0], [0, 1, 2], served) == 0


def test_a_shared_system_prompt_does_not_evict_another_conversation() -> None:
    # The prompt shares 3 tokens with slot 0, whose conversation diverges at its 4th prompt token.
    slots = [[1, 2, 3, 4, 5, 6, 7, 8], []]
    assert choose_slot([1, 2, 3, 42, 43], slots, [1, 0], [0, 1], [6, 0]) == 1
    # no empty slot: the least recently used one, not the one sharing the system prompt
    slots = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9]]
    assert choose_slot([1, 2, 3, 42, 43], slots, [2, 1], [0, 1], [6, 2]) == 1


def test_a_branch_sharing_most_of_a_slot_reuses_it() -> None:
    # another question about the same long document: diverges inside the served prompt, but
    # keeps 6 of the slot's 8 tokens
    slots = [[1, 2, 3, 4, 5, 6, 7, 8], []]
    assert choose_slot([1, 2, 3, 4, 5, 6, 42], slots, [1, 0], [0, 1], [7, 0]) == 0


def test_without_a_match_or_an_empty_slot_the_least_recently_used_is_evicted() -> None:
    slots = [[5, 5, 5, 5], [6, 6, 6, 6], [7, 7, 7, 7]]
    assert choose_slot([8, 8], slots, [7, 3, 9], [0, 1, 2]) == 1
    assert choose_slot([8, 8], slots, [7, 3, 9], [0, 2]) == 0  # slot 1 is not allowed (pinned)


def test_ties_go_to_the_most_recently_used_slot() -> None:
    slots = [[1, 2, 3], [1, 2, 3]]
    assert choose_slot([1, 2, 3, 4], slots, [1, 2], [0, 1], [3, 3]) == 1


def test_a_live_ticket_pins_its_slot_until_released() -> None:
    class T:
        released = False

    table = SlotTable(2)
    holder, borrower = T(), T()
    slots = [[1, 2, 3], []]
    assert table.choose([1, 2, 3, 4], slots, holder) == 0
    # the same prompt from a borrowing generation does not get the holder's slot
    assert table.choose([1, 2, 3, 4], slots, borrower) == 1
    holder.released = True
    assert table.choose([1, 2, 3, 4], slots, T()) == 0
    # every slot pinned: sharing one is still allowed (correct, only slower)
    full = SlotTable(1)
    full.choose([1], [[]], T())
    assert full.choose([1], [[]], T()) == 0


def test_default_slot_count_follows_the_kv_size() -> None:
    assert default_kv_slots(23_040, 2048) == 4  # SmolLM2 135M: 45 MiB per slot
    assert default_kv_slots(131_072, 8192) == 1  # an 8B Llama: 1 GiB per slot
    assert default_kv_slots(KV_BUDGET_BYTES // (2 * 4096), 4096) == 2
    assert default_kv_slots(None, 2048) == 1


# -- through the client ---------------------------------------------------------------------------

def test_interleaved_conversations_each_keep_their_prefix() -> None:
    backend = FakeBackend("Sure.", kv_slots=4, n_ctx=8192)
    client = fake_client(backend=backend)
    histories = {name: conversation(name, 3) for name in "ABCD"}
    for name in "ABCD":  # first turn of each: cold
        histories[name] = ask(client, histories[name], "first")
    for round_ in range(2):
        for name in "ABCD":
            backend.forward_calls.clear()
            messages = [*histories[name], {"role": "user", "content": f"round {round_}"}]
            prompt = client.count_tokens(messages)
            histories[name] = ask(client, histories[name], f"round {round_}")
            # only the new user turn (and the assistant header) was evaluated, not the history
            assert backend.forward_calls[0] < 40 < prompt / 5
    assert backend.n_slots == 4
    assert sorted(len(backend.slot_tokens(i)) > 0 for i in range(4)) == [True] * 4


def test_with_one_slot_interleaved_conversations_evict_each_other() -> None:
    backend = FakeBackend("Sure.", kv_slots=1, n_ctx=8192)
    client = fake_client(backend=backend)
    a, b = conversation("A", 3), conversation("B", 3)
    a = ask(client, a, "first")
    b = ask(client, b, "first")
    backend.forward_calls.clear()
    ask(client, a, "again")
    assert backend.forward_calls[0] > 100  # A's history was evaluated again


def test_least_recently_used_conversation_is_the_one_evicted() -> None:
    backend = FakeBackend("Sure.", kv_slots=2, n_ctx=8192)
    client = fake_client(backend=backend)
    a, b, c = conversation("A", 3), conversation("B", 3), conversation("C", 3)
    a = ask(client, a, "1")
    b = ask(client, b, "1")
    a = ask(client, a, "2")  # B is now the least recently used
    c = ask(client, c, "1")  # evicts B
    backend.forward_calls.clear()
    ask(client, a, "3")
    assert backend.forward_calls[0] < 40  # A survived
    backend.forward_calls.clear()
    ask(client, b, "2")
    assert backend.forward_calls[0] > 100  # B did not


def test_output_is_the_same_with_any_number_of_slots() -> None:
    def reply(prompt: str) -> str:
        return f"{len(prompt)} chars, last {prompt[-30:-20]!r}"

    transcripts = []
    for slots in (1, 3):
        client = fake_client(backend=FakeBackend(reply, kv_slots=slots, n_ctx=8192))
        histories = [conversation(name, 2) for name in "XYZW"]
        for turn in range(3):
            for i in range(4):
                histories[i] = ask(client, histories[i], f"turn {turn}")
        transcripts.append(histories)
    assert transcripts[0] == transcripts[1]


def test_a_borrowing_generation_gets_another_slot() -> None:
    backend = FakeBackend("abcdefghij", kv_slots=2, n_ctx=8192)
    client = fake_client(backend=backend)
    history = conversation("A", 2)
    holder = client.chat.completions.create(messages=history, stream=True)
    first = [next(holder), next(holder), next(holder)]  # the holder is mid-reply, then idles
    holder_slot = next(i for i in range(2) if backend.slot_tokens(i))
    holder_tokens = list(backend.slot_tokens(holder_slot))
    time.sleep(BORROW_AFTER_S + 0.1)
    # the same prompt: the holder's slot would be the best match, but it is pinned
    borrowed = client.chat.completions.create(messages=history)
    assert borrowed.choices[0].message.content == "abcdefghij"
    assert list(backend.slot_tokens(holder_slot)) == holder_tokens  # untouched
    backend.forward_calls.clear()
    rest = list(holder)
    text = "".join(c.choices[0].delta.content or "" for c in [*first, *rest] if c.choices)
    assert text == "abcdefghij"
    assert set(backend.forward_calls) == {1}  # resumed on its own cache: no re-evaluation


def test_clear_cache_empties_every_slot() -> None:
    backend = FakeBackend("Sure.", kv_slots=3)
    client = fake_client(backend=backend)
    for name in "ABC":
        ask(client, conversation(name, 1), "hi")
    assert all(backend.slot_tokens(i) for i in range(3))
    backend.clear_cache()
    assert not any(backend.slot_tokens(i) for i in range(3))


def test_a_slot_view_acts_on_its_own_slot_only() -> None:
    backend = FakeBackend("x", kv_slots=2)
    view0, view1 = SlotView(backend, 0), SlotView(backend, 1)
    view0.forward([1, 2, 3])
    view1.forward([7, 8])
    view0.forward([4])
    assert list(backend.slot_tokens(0)) == [1, 2, 3, 4] and list(view1.cached_tokens) == [7, 8]
    assert view1.truncate_cache(1) == 1 and list(backend.slot_tokens(0)) == [1, 2, 3, 4]
    view0.owner = "g0"
    assert view1.owner is None
    with pytest.raises(IndexError):
        SlotView(backend, 2)


# -- load options ---------------------------------------------------------------------------------

BASE: dict[str, Any] = {"model": None, "model_path": None, "context_length": None, "temperature": 0.7,
                        "top_p": 0.9, "cache_dir": None, "n_threads": None, "dtype": None, "device": None}


@pytest.mark.parametrize(("name", "value"), [
    ("kv_slots", 0), ("kv_slots", 65), ("kv_slots", 2.0), ("kv_slots", True),
    ("n_gpu_layers", -2), ("n_gpu_layers", "all"), ("flash_attn", 1), ("main_gpu", -1),
    ("tensor_split", "3,1"), ("tensor_split", [1, -1]), ("tensor_split", [0, 0]),
])
def test_bad_load_options_name_the_parameter(name: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_settings(**BASE, backend="llama.cpp", environ={}, **{name: value})
    assert info.value.param == name


@pytest.mark.parametrize(("name", "value"), [
    ("n_gpu_layers", -1), ("flash_attn", True), ("main_gpu", 0), ("tensor_split", [1.0, 1.0]),
])
def test_llama_cpp_options_are_rejected_by_transformers(name: str, value: object) -> None:
    assert getattr(resolve_settings(**BASE, backend="llama.cpp", environ={}, **{name: value}), name) is not None
    with pytest.raises(InvalidRequestError, match=r"llama\.cpp") as info:
        resolve_settings(**BASE, backend="transformers", environ={}, **{name: value})
    assert info.value.param == name


def test_load_options_reach_the_backend_options() -> None:
    client = LLMClient(kv_slots=3, n_gpu_layers=-1, flash_attn=True, main_gpu=0, tensor_split=[3, 1])
    options = client.options
    assert (options.kv_slots, options.n_gpu_layers, options.flash_attn, options.main_gpu,
            options.tensor_split) == (3, -1, True, 0, (3.0, 1.0))
    env = resolve_settings(**BASE, backend=None, environ={"LOCAL_LLM_KIT_KV_SLOTS": "2",
                                                          "LOCAL_LLM_KIT_N_GPU_LAYERS": "12"})
    assert (env.kv_slots, env.n_gpu_layers) == (2, 12)
    with pytest.raises(InvalidRequestError) as info:
        resolve_settings(**BASE, backend=None, environ={"LOCAL_LLM_KIT_KV_SLOTS": "many"})
    assert info.value.param == "LOCAL_LLM_KIT_KV_SLOTS"


def test_a_prompt_cached_whole_reuses_its_own_pass_logits() -> None:
    from local_llm_kit.decoding import prefill
    from local_llm_kit.testing import FakeBackend

    backend = FakeBackend("abc")
    prompt = [5, 6, 7]
    first = prefill(backend, prompt).copy()
    backend.forward([8, 9])  # a reply after it
    calls = len(backend.forward_calls)
    again = prefill(backend, prompt)
    assert np.array_equal(again, first) and len(backend.forward_calls) == calls  # no pass of the last token
    assert list(backend.cached_tokens) == prompt
    again[:] = 0  # the caller may change what it got (the sampler does, in place)
    assert np.array_equal(prefill(backend, prompt), first)
    backend.truncate_cache(1)  # trimmed below the prompt: its tokens will be evaluated anew
    backend.forward([6, 7])
    assert backend.recall_logits(3) is None
