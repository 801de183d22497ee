"""Grammar building, the compiled-grammar cache and the token-mask constraint, on the fake byte tokenizer."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import pytest

from local_llm_kit.constraints import (
    CallSyntax,
    GrammarCache,
    GrammarConstraint,
    close_objects,
    json_schema_grammar,
    lark_string,
    regex_escape,
    tool_call_grammar,
)
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.testing import FakeBackend, fake_client

BACKEND = FakeBackend()
TOKENIZER = BACKEND.llg_tokenizer()
EOS = BACKEND.info.eos_token_ids
N_VOCAB = BACKEND.info.n_vocab
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
SYNTAX = CallSyntax("<tool_call>", "</tool_call>", "", "arguments")


def constraint(grammar: str, n_vocab: int = N_VOCAB) -> GrammarConstraint:
    return GrammarConstraint(GrammarCache().compile(TOKENIZER, grammar, param="p"), n_vocab, EOS)


def accepts(grammar: str, text: str) -> bool:
    """Whether the grammar accepts exactly ``text`` (and may end there)."""
    matcher = llguidance.LLMatcher(TOKENIZER, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(BACKEND.tokenize(text)) and matcher.is_accepting()


def allowed_after(c: GrammarConstraint, n: int = N_VOCAB) -> set[int]:
    logits = np.zeros(n, dtype=np.float32)
    c.mask_logits(logits)
    return {int(t) for t in np.flatnonzero(np.isfinite(logits))}


def feed(c: GrammarConstraint, text: str) -> list[int]:
    """Consume ``text`` byte by byte, skipping bytes the grammar forced; returns all forced tokens."""
    forced_all: list[int] = []
    pending = list(text.encode())
    while pending:
        token = pending.pop(0)
        assert c.allows(token), f"{bytes([token])!r} rejected"
        forced = c.consume(token)
        forced_all += forced
        assert pending[: len(forced)] == forced
        del pending[: len(forced)]
    return forced_all


# -- grammars ------------------------------------------------------------------------------
def test_json_grammar_is_compact_and_follows_the_schema() -> None:
    grammar = json_schema_grammar(SCHEMA)
    assert accepts(grammar, '{"name": "Bo", "age": 3}')
    assert not accepts(grammar, '{"name":"Bo","age":3}')
    assert not accepts(grammar, '{\n  "name": "Bo", "age": 3}')
    assert not accepts(grammar, '{"name": "Bo", "age": "3"}')


def test_schema_layout_can_be_overridden_by_the_schema() -> None:
    grammar = json_schema_grammar({**SCHEMA, "x-guidance": {"item_separator": ",", "key_separator": ":"}})
    assert accepts(grammar, '{"name":"Bo","age":3}')


def test_close_objects_forbids_invented_keys_but_keeps_valid_outputs_valid() -> None:
    closed = close_objects({"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "integer"}}}}, "$defs": {"x": {"properties": {"c": {}}}}})
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["$defs"]["x"]["additionalProperties"] is False
    assert not accepts(json_schema_grammar(SCHEMA), '{"name": "Bo", "age": 3, "x": 1}')


@pytest.mark.parametrize("schema", [
    {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},
    {"properties": {"a": {}}, "additionalProperties": {"type": "integer"}},
    {"properties": {"a": {}}, "required": ["a", "b"]},
    {"properties": {"a": {}}, "minProperties": 2},
    {"properties": {"a": {}}, "anyOf": [{"required": ["a"]}]},
])
def test_close_objects_leaves_open_what_it_cannot_close_safely(schema: dict[str, Any]) -> None:
    assert "additionalProperties" not in close_objects(schema) or close_objects(schema) == schema


def test_close_objects_leaves_data_keywords_alone() -> None:
    schema = {"enum": [{"properties": {"x": 1}}], "const": {"properties": {}}, "default": {"properties": {}}}
    assert close_objects(schema) == schema


def test_literals_and_regex_escaping_survive_llguidance() -> None:
    text = 'a "quoted" \\ line\nand é'
    assert accepts(f"start: {lark_string(text)}", text)
    marker = "<a.b*(c)|d>\n"
    assert accepts(f"start: /x{regex_escape(marker)}/", "x" + marker)
    assert not accepts(f"start: /x{regex_escape(marker)}/", "x<aXbb(c)|d>\n")


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.mark.parametrize(("content", "text", "ok"), [
    ("none", CALL, True),
    ("none", CALL + CALL, True),
    ("none", "Sure. " + CALL, False),
    ("none", CALL.replace("get_weather", "get_time"), False),
    ("none", CALL.replace('"Paris"', "7"), False),
    ("text", "Just text, with a < and <tool_ in it.", True),
    ("text", "Let me check. " + CALL, True),
    ("text", "Text " + CALL + " and more text", False),
    ("text", "Text <tool_call>garbage", False),
    ("json", '{"answer": 1}', True),
    ("json", CALL, True),
    ("json", "plain text", False),
    ("forbid", "Any text at all.", True),
    ("forbid", "Calling " + CALL, False),
])
def test_tool_call_grammar(content: Any, text: str, ok: bool) -> None:
    grammar = tool_call_grammar([("get_weather", WEATHER)], SYNTAX, content=content, parallel=True,
                                content_schema={"type": "object"})
    assert accepts(grammar, text) is ok


def test_tool_call_grammar_single_call_when_not_parallel() -> None:
    grammar = tool_call_grammar([("get_weather", WEATHER)], SYNTAX, content="none", parallel=False)
    assert accepts(grammar, CALL) and not accepts(grammar, CALL + CALL)


def test_tool_call_grammar_with_special_token_markers() -> None:
    syntax = CallSyntax("<|im_start|>", "<|im_end|>", "", "arguments", open_token=257, close_token=258)
    grammar = tool_call_grammar([("get_weather", WEATHER)], syntax, content="text", parallel=True)
    body = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert accepts(grammar, f"Hello<|im_start|>{body}<|im_end|>")
    assert accepts(grammar, "Hello")


# -- the cache -----------------------------------------------------------------------------
def test_cache_compiles_once_per_content() -> None:
    cache = GrammarCache()
    grammar = json_schema_grammar(SCHEMA)
    first = cache.compile(TOKENIZER, grammar, param="response_format")
    assert cache.compile(TOKENIZER, json_schema_grammar(json.loads(json.dumps(SCHEMA))), param="x") is first
    assert (cache.hits, cache.misses) == (1, 1)


def test_cache_reports_the_engines_reason_and_remembers_failures() -> None:
    cache = GrammarCache()
    grammar = json_schema_grammar({"type": "string", "format": "no-such-format"})
    for _ in range(2):
        with pytest.raises(InvalidRequestError) as info:
            cache.compile(TOKENIZER, grammar, param="response_format")
        assert info.value.param == "response_format"
        assert "no-such-format" in str(info.value)
    assert cache.misses == 1


def test_cache_is_bounded() -> None:
    cache = GrammarCache(max_entries=2)
    for n in range(4):
        cache.compile(TOKENIZER, json_schema_grammar({"const": n}), param="p")
    assert len(cache._entries) == 2


# -- the constraint ------------------------------------------------------------------------
def test_mask_matches_the_grammar_and_allows_agrees_with_it() -> None:
    c = constraint(json_schema_grammar(SCHEMA))
    assert allowed_after(c) == {ord("{")}  # forced first token, canonical
    assert c.consume(ord("{")) == list(b'"name": "')
    for prefix in ("B", "o"):
        allowed = allowed_after(c)
        assert all(c.allows(t) == (t in allowed) for t in range(N_VOCAB))
        assert c.consume(ord(prefix)) == []
    assert c.consume(ord('"')) == list(b', "age": ')
    assert allowed_after(c) == set(b"-0123456789")


def test_eos_only_when_the_grammar_may_end() -> None:
    c = constraint("start: /[a-z]+/")
    assert not EOS & allowed_after(c)
    assert not any(c.allows(t) for t in EOS)
    c.consume(ord("a"))
    assert allowed_after(c) >= EOS  # 258 is the tokenizer's EOS; 256 is only the backend's
    assert all(c.allows(t) for t in EOS)
    assert not c.is_complete()


def test_complete_and_forced_tokens() -> None:
    c = constraint(json_schema_grammar(SCHEMA))
    forced = feed(c, '{"name": "Bo", "age": 3}')
    assert bytes(forced).startswith(b'"name": "')
    assert c.is_complete()


@pytest.mark.parametrize("n_vocab", [N_VOCAB + 45, N_VOCAB - 2])
def test_logits_longer_or_shorter_than_the_vocabulary(n_vocab: int) -> None:
    c = constraint("start: /[a-z]+/ <[258]>?", n_vocab=n_vocab)
    allowed = allowed_after(c, n_vocab)
    assert allowed == set(range(ord("a"), ord("z") + 1))
    assert not c.allows(n_vocab - 1)


@pytest.mark.parametrize("density", [0.001, 0.3, 1.0])
def test_fast_mask_application_equals_llguidances_reference(density: float) -> None:
    rng = np.random.default_rng(0)
    vocab = 262144
    c = GrammarConstraint.__new__(GrammarConstraint)
    c._n = vocab
    c._bitmask = llg_numpy.allocate_token_bitmask(1, vocab)
    c._words = c._bitmask[0]
    c._bytes = c._words.view(np.uint8)
    bits = rng.random(vocab) < density
    c._words[:] = np.packbits(bits, bitorder="little").view(np.int32)
    logits = rng.standard_normal(vocab).astype(np.float32)
    expected = logits.copy()[None, :]
    llg_numpy.apply_token_bitmask_inplace(expected, c._bitmask)
    c._apply(logits)
    np.testing.assert_array_equal(logits, expected[0])


# -- through the decode loop ---------------------------------------------------------------
def test_constrained_generation_repairs_what_the_model_would_have_written() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"}},
              "required": ["name", "ok"]}
    client = fake_client(reply='{"name": "Bo", "ok": "yes"}', temperature=0)
    response = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}], max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == '{"name": "Bo", "ok": false}'  # the fake's fallback is the lowest id
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_logprobs_describe_the_constrained_distribution() -> None:
    client = fake_client(reply="not json")
    response = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}], max_tokens=40, logprobs=True, top_logprobs=3,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "p", "schema": {"enum": ["yes", "no"]}}})
    assert response.choices[0].message.content in ('"yes"', '"no"')
    for entry in response.choices[0].logprobs.content:
        assert np.isfinite(entry.logprob)
        assert all(np.isfinite(alt.logprob) for alt in entry.top_logprobs)


def test_sampling_with_temperature_stays_valid() -> None:
    client = fake_client(reply='{"name": "Bo"}')
    for seed in range(3):
        response = client.chat.completions.create(
            messages=[{"role": "user", "content": "hi"}], max_tokens=80, temperature=1.5, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
        # Valid whatever the finish: a reply cut by max_tokens is closed by the grammar.
        jsonschema.validate(json.loads(response.choices[0].message.content or ""), SCHEMA)
