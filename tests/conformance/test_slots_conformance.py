"""The multi-slot prefix cache on the real models: interleaved conversations, same greedy output."""

from __future__ import annotations

from typing import Any

import pytest

from local_llm_kit import LLMClient

pytestmark = pytest.mark.integration

TOPICS = ("the moon", "volcanoes", "bread")
# Long enough that the conversations differ in most of their tokens, not only after a shared
# system prompt (SmolLM2's template adds a default one).
DETAIL = " Please answer in plain words, as if to a curious child who has never read about it before, and " \
         "mention one surprising fact, one common mistake people make about it, and where to learn more."


def _interleaved_then_cold(client: LLMClient) -> None:
    """Three conversations take turns; each warm reply must equal a cold evaluation of its prompt."""
    backend = client.engine.backend
    assert backend.n_slots >= 3, "the packaged models get several slots by default"
    histories: list[list[dict[str, Any]]] = [[{"role": "user", "content": f"Tell me about {t}.{DETAIL}"}]
                                             for t in TOPICS]
    warm: list[tuple[list[dict[str, Any]], str]] = []
    for turn in range(2):
        for i, history in enumerate(histories):
            reply = client.chat.completions.create(messages=history, max_tokens=8)
            text = reply.choices[0].message.content or ""
            warm.append((list(history), text))
            histories[i] = [*history, {"role": "assistant", "content": text},
                            {"role": "user", "content": f"And what else, part {turn}?"}]
    used = [i for i in range(backend.n_slots) if backend.slot_tokens(i)]
    assert len(used) >= 3, "each conversation kept a slot of its own"
    for messages, text in warm[len(TOPICS):]:  # the second turns: served from each one's slot
        backend.clear_cache()
        cold = client.chat.completions.create(messages=messages, max_tokens=8)
        assert cold.choices[0].message.content == text


def test_interleaved_conversations_match_cold_runs_smollm2(smol: LLMClient) -> None:
    _interleaved_then_cold(smol)


def test_interleaved_conversations_match_cold_runs_gemma(gemma: LLMClient) -> None:
    _interleaved_then_cold(gemma)


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
