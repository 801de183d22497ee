"""The multi-slot prefix cache on the real models: interleaved conversations, same greedy output."""

from __future__ import annotations

import pytest

from local_llm_kit import LLMClient

pytestmark = pytest.mark.integration

TOPICS = ("the moon", "volcanoes", "bread")
# Long enough that the conversations differ in most of their tokens, not only after a shared
# system prompt (SmolLM2's template adds a default one).
DETAIL = " Please answer in plain words, as if to a curious child who has never read about it before, and " \
         "mention one surprising fact, one common mistake people make about it, and where to learn more."


def _interleaved_equals_alone(client: LLMClient) -> None:
    """Three conversations take turns; each one's replies equal those it gets alone on an empty cache.

    Not a cold evaluation of each final prompt: llama.cpp computes a reply's keys and values one
    token at a time, and the same tokens in one batch can differ in the last bits, which can flip
    a close greedy choice; that is a property of KV reuse itself, with one slot as with four.
    Alone, a conversation reuses its own cache the same way: the slots must change nothing.
    """
    backend = client.engine.backend
    assert backend.n_slots >= 3, "the packaged models get several slots by default"

    def run(order: list[int]) -> dict[int, list[str]]:
        histories = {i: [{"role": "user", "content": f"Tell me about {t}.{DETAIL}"}] for i, t in enumerate(TOPICS)}
        replies: dict[int, list[str]] = {i: [] for i in histories}
        for i in order:
            reply = client.chat.completions.create(messages=histories[i], max_tokens=8)
            text = reply.choices[0].message.content or ""
            replies[i].append(text)
            histories[i] = [*histories[i], {"role": "assistant", "content": text},
                            {"role": "user", "content": f"And what else, part {len(replies[i])}?"}]
        return replies

    backend.clear_cache()
    interleaved = run([0, 1, 2, 0, 1, 2, 0, 1, 2])
    used = [i for i in range(backend.n_slots) if backend.slot_tokens(i)]
    assert len(used) >= 3, "each conversation kept a slot of its own"
    for i in range(len(TOPICS)):
        backend.clear_cache()
        assert run([i, i, i])[i] == interleaved[i]


def test_interleaved_conversations_match_each_alone_smollm2(smol: LLMClient) -> None:
    _interleaved_equals_alone(smol)


def test_interleaved_conversations_match_each_alone_gemma(gemma: LLMClient) -> None:
    _interleaved_equals_alone(gemma)


def test_second_turns_reuse_their_own_slot(smol: LLMClient) -> None:
    backend = smol.engine.backend
    backend.clear_cache()
    histories = [[{"role": "user", "content": f"Tell me about {t}.{DETAIL}"}] for t in TOPICS]
    for i, history in enumerate(histories):
        reply = smol.chat.completions.create(messages=history, max_tokens=4)
        histories[i] = [*history, {"role": "assistant", "content": reply.choices[0].message.content},
                        {"role": "user", "content": "Go on."}]
    lengths = {i: len(backend.slot_tokens(i)) for i in range(backend.n_slots)}
    for history in histories:
        smol.chat.completions.create(messages=history, max_tokens=4)
    grown = [i for i in range(backend.n_slots) if len(backend.slot_tokens(i)) > lengths[i] > 0]
    assert len(grown) == len(TOPICS)  # every conversation continued in the slot that held it
