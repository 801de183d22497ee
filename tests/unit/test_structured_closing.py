"""Closing a structure from any state (closing.Closer and GrammarConstraint.fit), on scripted models.

The decode loop is mimicked token by token (check, mask, fit, consume) with a "model" that proposes
the next token of a script, so each test states exactly what the model keeps writing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

import jsonschema
import llguidance
import llguidance.numpy as llg_numpy
import pytest

from local_llm_kit.constraints import GrammarCache, GrammarConstraint, json_schema_grammar

# A byte-level vocabulary in which letters and digits have lower ids than punctuation, as in
# Gemma's (``e`` is 236744 there, ``,`` 236764); the fake backend's vocabulary is in byte order.
GEMMA_ORDER = sorted(range(256), key=lambda b: (not chr(b).isalnum(), b))
END = 256


class _Vocab:
    eos_token_id = END
    bos_token_id = None
    tokens: ClassVar[list[bytes]] = [bytes([b]) for b in GEMMA_ORDER] + [b"\xff<|end|>"]
    special_token_ids: ClassVar[list[int]] = [END]
    _ids: ClassVar[dict[int, int]] = {b: i for i, b in enumerate(GEMMA_ORDER)}

    def __call__(self, text: bytes) -> list[int]:
        return [self._ids[b] for b in text]


TOKENIZER = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()))
N_VOCAB = 257
SALARY = {  # calculate_gross_salary from the JSONSchemaBench corpus (Glaiveai2K)
    "type": "object", "required": ["basic_salary", "allowances"],
    "properties": {"allowances": {"type": "object", "required": ["housing_allowance", "transport_allowance"],
                                  "properties": {"housing_allowance": {"type": "number"},
                                                 "transport_allowance": {"type": "number"}}},
                   "basic_salary": {"type": "number"}}}


def ids(text: str) -> list[int]:
    return _Vocab()(text.encode())


def text_of(tokens: list[int]) -> str:
    return bytes(GEMMA_ORDER[t] for t in tokens if t != END).decode()


def grammar(schema: Any) -> Any:
    return GrammarCache().compile(TOKENIZER, json_schema_grammar(schema), param="response_format")


def decode(schema: Any, propose: Callable[[str], str], max_tokens: int) -> tuple[str, str]:
    """The decode loop's constraint calls, with a model that proposes the first byte ``propose(text)``
    returns (a byte the grammar rejects is replaced by the lowest allowed id, as a masked argmax of
    equal logits would). Returns the text and the finish reason."""
    c = GrammarConstraint(grammar(schema), N_VOCAB, {END})
    bitmask = llg_numpy.allocate_token_bitmask(1, N_VOCAB)
    out: list[int] = []
    steered = False  # a reply steered to its end was cut, however it ends
    while True:
        remaining = max_tokens - len(out)
        if remaining <= 0:
            return text_of(out), "length"
        wanted = propose(text_of(out))
        token = ids(wanted[:1])[0] if wanted else END
        if not c.allows(token):
            llg_numpy.fill_next_token_bitmask(c._matcher, bitmask)
            token = next(t for t in range(N_VOCAB) if (int(bitmask[0][t >> 5]) >> (t & 31)) & 1)
        fitted = c.fit(token, remaining)
        if fitted is None:
            return text_of(out), "length"
        steered = steered or fitted != token
        if fitted == END:
            return text_of(out), "length" if steered else "stop"
        out.append(fitted)
        out += c.consume(fitted)
        if c.is_complete():
            return text_of(out), "length" if steered else "stop"


def scripted(script: str) -> Callable[[str], str]:
    """A model that writes ``script`` while the reply follows it, then nothing more (end of turn)."""
    return lambda text: script[len(text):] if script.startswith(text) else ""


def test_the_shortest_reply_is_found_when_punctuation_has_high_ids() -> None:
    # The search used to rank ``,`` as any other character, by id: after a digit it took ``e`` and
    # then wrote exponent digits forever, so no completion (and no minimum) was found.
    assert grammar(SALARY).min_tokens(N_VOCAB, {END}) == len(
        '{"allowances": {"housing_allowance": 0, "transport_allowance": 0}, "basic_salary": 0}')


@pytest.mark.parametrize("max_tokens", [85, 90, 128])  # 85: the shortest reply (one byte a token)
def test_a_number_the_model_keeps_extending_is_closed(max_tokens: int) -> None:
    # Seen on Gemma 3 (llama.cpp) at max_tokens 32:
    # '{"allowances": {"housing_allowance": 100000000000000000000' with finish "length".
    script = '{"allowances": {"housing_allowance": 1' + "0" * 1000
    text, reason = decode(SALARY, scripted(script), max_tokens)
    assert reason == "length" and len(ids(text)) <= max_tokens
    value = json.loads(text)
    jsonschema.validate(value, SALARY)
    if max_tokens > 85:  # with room to spare, the model's own number is kept, then closed
        assert str(int(value["allowances"]["housing_allowance"])).startswith("1000")


@pytest.mark.parametrize("schema", [
    {"type": "array", "items": {"type": "number"}, "minItems": 3},
    {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "integer"}}, "required": ["x", "y"]},
])
def test_numbers_inside_arrays_and_objects_are_closed(schema: Any) -> None:
    script = ("[1.5, 2" if schema["type"] == "array" else '{"x": 2.5e1') + "0" * 1000
    text, reason = decode(schema, scripted(script), 40)
    assert reason == "length"
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("pattern", ["^[0-9]+$", "^[a-z0-9-]+$", "^[-_=0-9A-Za-z]+$"])
def test_strings_with_a_pattern_are_closed(pattern: str) -> None:
    # No backslash is allowed in such a string, so the search took it for the outside of a string,
    # where ``0`` ranks before a quote, and wrote ``0`` forever (o8776, o21481, o40353 of the corpus).
    schema = {"type": "object", "properties": {"id": {"type": "string", "pattern": pattern}}, "required": ["id"]}
    shortest = grammar(schema).shortest_reply(N_VOCAB, {END})
    assert shortest is not None and len(shortest) <= len('{"id": "0000"}')  # four tries of a digit at most
    text, reason = decode(schema, scripted('{"id": "' + "1" * 1000), 40)
    assert reason == "length"
    jsonschema.validate(json.loads(text), schema)


def test_a_search_that_cannot_succeed_is_not_repeated_at_every_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # The string must contain 70 "w" in a row: too long for a sample text (local_llm_kit.witnesses),
    # and beyond what the greedy search finds alone (it sets "w" aside after 4): while the model stays in
    # it, searches fail, and are retried after 1, 2, 4... tokens rather than at each one.
    from local_llm_kit.closing import Closer

    calls: list[int] = []
    original = Closer.complete

    def counted(self: Closer, *args: Any, **kwargs: Any) -> list[int] | None:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Closer, "complete", counted)
    schema = {"type": "string", "pattern": "w{70}"}
    text, _ = decode(schema, scripted('"' + "]" * 1000), 200)
    assert text.startswith('"]]]]')
    assert len(calls) < 20


@pytest.mark.parametrize("max_tokens", [8, 20, 33])
def test_free_text_beside_tools_is_cut_where_the_budget_ends_not_steered(max_tokens: int) -> None:
    """tool_choice="auto": a text reply that reaches max_tokens is plain text, cut like any other.
    The closing reused its first completion (a token that ends a still-empty text) long after the
    text could end on its own, and wrote it as the last token of every cut reply."""
    from local_llm_kit.testing import fake_client

    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
    story = "Once upon a time a dragon guarded a mountain of gold and slept for a hundred years."
    client = fake_client(story)
    question = [{"role": "user", "content": "A story?"}]
    for choice in ("auto", "none"):
        reply = client.chat.completions.create(messages=question, tools=tools, tool_choice=choice,
                                               max_tokens=max_tokens)
        assert reply.choices[0].finish_reason == "length"
        assert reply.choices[0].message.content == story[:max_tokens], choice  # one token per byte
