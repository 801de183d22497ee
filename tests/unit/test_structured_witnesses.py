"""Sample texts for patterned strings (local_llm_kit.witnesses) and the closing search that uses them."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import llguidance
import pytest

from local_llm_kit.closing import closer_for
from local_llm_kit.constraints import (
    CallSyntax,
    GrammarCache,
    json_schema_grammar,
    tool_call_grammar,
)
from local_llm_kit.testing import FakeBackend
from local_llm_kit.witnesses import FORMAT_SAMPLES, pattern_sample, witnesses

TOKENIZER = FakeBackend().llg_tokenizer()
END = TOKENIZER.eos_tokens[0]
LIMIT = TOKENIZER.vocab_size


@pytest.mark.parametrize("pattern", [
    "wifi", "monitor", r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}.\d{6}", r"^([a-z0-9]+(-[a-z0-9]+)*\.)+[a-z]{2,}$",
    r"^[\w.]+$", r"^adocean[\w.]+$", "^(GET|POST|PUT)$", r"^[^\s@]+@[^\s@]+$", r"^(\d+)-\1$", "^[A-Z]{3}$",
    r"^#[0-9a-fA-F]{6}$", r"^\+?[1-9]\d{1,14}$", "^(?:[a-z]+)?$",
])
def test_a_pattern_sample_matches_its_pattern(pattern: str) -> None:
    sample = pattern_sample(pattern)
    assert sample is not None and re.search(pattern, sample)


def test_a_pattern_that_cannot_be_read_or_is_too_long_has_no_sample() -> None:
    assert pattern_sample("([a-z]") is None
    assert pattern_sample("^a{500}$") is None


@pytest.mark.parametrize("fmt", sorted(FORMAT_SAMPLES))
def test_each_format_sample_is_accepted_by_the_grammar(fmt: str) -> None:
    schema = {"type": "string", "format": fmt}
    matcher = llguidance.LLMatcher(TOKENIZER, json_schema_grammar(schema), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    tokens = TOKENIZER.tokenize_str(json.dumps(FORMAT_SAMPLES[fmt]))
    assert matcher.validate_tokens([*tokens, END]) == len(tokens) + 1


def test_witnesses_are_read_from_json_and_lark_grammars() -> None:
    schema = {"type": "object", "properties": {"mail": {"type": "string", "format": "email"},
                                               "q": {"type": "string", "pattern": '^"[a-z]"$'}},
              "patternProperties": {"^x-[0-9]+$": {}}}
    assert witnesses(json_schema_grammar(schema)) == (b"x-0", b'\\"a\\"', b"a@a.aa")  # JSON-escaped, shortest first
    lark = tool_call_grammar([("f", {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}})],
                             CallSyntax("<tool_call>", "</tool_call>", None, "arguments"), content="none",
                             parallel=False)
    assert witnesses(lark) == (b"2000-01-01",)
    assert witnesses(json_schema_grammar({"type": "string"})) == ()


CASES: list[tuple[dict[str, Any], str]] = [  # schema, what a model wrote before the budget ran out
    ({"type": "object", "properties": {"type": {"type": "string", "pattern": "wifi"}}, "required": ["type"]},
     '{"type": "monitor mode '),
    ({"type": "object", "properties": {"t": {"type": "string", "pattern": r"\d{4}-\d{2}-\d{2}T\d{2}"}},
      "required": ["t"]}, '{"t": "created at 20'),
    ({"type": "object", "properties": {"mail": {"type": "string", "format": "email"}}, "required": ["mail"]},
     '{"mail": "john'),
    ({"type": "object", "properties": {"mail": {"type": "string", "format": "email"}}, "required": ["mail"]},
     '{"mail": "john@example.'),
    ({"type": "array", "items": {"type": "string", "pattern": r"^([a-z0-9]+(-[a-z0-9]+)*\.)+[a-z]{2,}$"},
      "minItems": 2}, '["example.com", "my-site'),
]


@pytest.mark.parametrize(("schema", "written"), CASES)
def test_a_patterned_string_is_completed_from_inside(schema: dict[str, Any], written: str) -> None:
    # The masks alone cannot say which characters lead to the closing quote; the greedy search wrote
    # "0" and "}" until it gave up, so these replies were cut (five schemas of the corpus).
    compiled = GrammarCache().compile(TOKENIZER, json_schema_grammar(schema), param="response_format")
    matcher = compiled.matcher()
    assert matcher.consume_tokens(TOKENIZER.tokenize_str(written))
    closer = closer_for(TOKENIZER)
    path = closer.complete(matcher, {END}, LIMIT, tails=compiled.tails)
    assert path is not None
    text = written + TOKENIZER.decode_str(path)
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
    assert text.startswith(written)


def test_without_tails_the_greedy_search_finds_no_email() -> None:
    # What these tests guard against: the masks alone give no way out of an e-mail address.
    schema = {"type": "object", "properties": {"mail": {"type": "string", "format": "email"}}, "required": ["mail"]}
    compiled = GrammarCache().compile(TOKENIZER, json_schema_grammar(schema), param="response_format")
    assert closer_for(TOKENIZER).complete(compiled.matcher(), {END}, LIMIT) is None
    shortest = compiled.shortest_reply(LIMIT, {END})
    assert shortest is not None and TOKENIZER.decode_str(list(shortest)) == '{"mail": "a@a.aa"}'
