"""Token counts against an independent oracle, and KV splicing that only touches generated replies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from local_llm_kit import LLMClient
from tests.conformance.conftest import load

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Is Paris the capital of France? Say Yes or No."},
     {"role": "assistant", "content": "Yes"},
     {"role": "user", "content": "And Rome of Italy?"}],
    [{"role": "user", "content": "Spell ünïcödé and 東京 please."},
     {"role": "assistant", "content": "ü-n-ï-c-ö-d-é, 東-京"},
     {"role": "user", "content": "Thanks!\n\n  Bye."}],
]


def test_count_tokens_equals_transformers_apply_chat_template(smol: LLMClient, cache_dir: Path) -> None:
    # The oracle: Hugging Face's tokenizer and its own chat-template code, not our renderer.
    tokenizer = load("smollm2-135m-instruct", "transformers", cache_dir).engine.backend.tokenizer  # type: ignore[attr-defined]
    for messages in CONVERSATIONS:
        oracle = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = oracle["input_ids"] if isinstance(oracle, dict) or hasattr(oracle, "keys") else oracle
        assert smol.count_tokens(messages) == len(ids), messages
        reply = smol.chat.completions.create(messages=messages, max_tokens=1)
        assert reply.usage.prompt_tokens == len(ids)


def test_prompt_ids_differ_from_canonical_ids_only_inside_generated_replies(smol: LLMClient) -> None:
    engine = smol.engine
    question = [{"role": "user", "content": "Answer with one word: what is the capital of France? Paris or Lyon?"}]
    reply = smol.chat.completions.create(messages=question, max_tokens=8).choices[0].message.content or ""
    assert reply
    conversation = [*question, {"role": "assistant", "content": reply}, {"role": "user", "content": "Sure?"}]
    ids = engine.encode(conversation)
    text = engine.render(conversation)
    header = engine.render(question)  # the conversation up to where the reply starts
    assert text.startswith(header + reply)
    before = engine.backend.tokenize(header)
    after_text = text[len(header) + len(reply):]
    assert ids[: len(before)] == before
    after = engine.backend.tokenize(after_text)
    assert ids[len(ids) - len(after):] == after
    spliced = ids[len(before): len(ids) - len(after)]
    assert b"".join(engine.backend.token_bytes(t) for t in spliced).decode() == reply
