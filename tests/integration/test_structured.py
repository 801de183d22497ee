"""Structured output on llama.cpp with real models: corpus samples, errors, caching, a large vocabulary."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from local_llm_kit import InvalidRequestError, LLMClient
from local_llm_kit.constraints import grammar_cache
from local_llm_kit.request import validate_request
from local_llm_kit.structured import select_output_mode

pytestmark = pytest.mark.integration
pytest.importorskip("llama_cpp")

# The corpus lives beside the repository (``<repo>/../shared``), in CI as here: a missing corpus fails.
CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "jsonschemabench"


@pytest.fixture(scope="module")
def corpus() -> Path:
    assert CORPUS.is_dir(), f"the JSONSchemaBench corpus is missing: expected it at {CORPUS}"
    return CORPUS


@pytest.fixture(scope="module")
def smol(cache_dir: Path) -> LLMClient:
    client = LLMClient("smollm2-135m-instruct", temperature=0, cache_dir=cache_dir).load()
    client.disable_memory()
    return client


@pytest.fixture(scope="module")
def gemma(cache_dir: Path) -> LLMClient:
    client = LLMClient("gemma-3-270m", temperature=0, cache_dir=cache_dir).load()
    client.disable_memory()
    return client


def corpus_sample(root: Path, every: int) -> list[tuple[str, Any]]:
    paths = sorted(root.glob("*/*.json"))
    assert len(paths) == 240, f"expected the 240 schemas of the corpus, found {len(paths)}"
    return [(f"{p.parent.name}/{p.name}", json.loads(p.read_text())) for p in paths[::every]]


def validate(text: str, schema: Any) -> None:
    value = json.loads(text)
    jsonschema.validators.validator_for(schema)(schema).validate(value)


def test_every_corpus_schema_is_accepted_when_not_strict(smol: LLMClient, corpus: Path) -> None:
    """Non-strict coverage of the corpus: all 240 compile (what the grammar cannot enforce is checked after)."""
    tokenizer_vocab = smol.engine.backend.info.n_vocab
    rejected, relaxed = [], []
    for name, schema in corpus_sample(corpus, every=1):
        request = validate_request(
            {"messages": [{"role": "user", "content": "x"}], "response_format": {
                "type": "json_schema", "json_schema": {"name": "example", "schema": schema}}},
            default_temperature=0.0, default_top_p=1.0, n_vocab=tokenizer_vocab)
        try:
            output = select_output_mode(smol.engine, request)
        except InvalidRequestError as exc:
            rejected.append(f"{name}: {exc}")
            continue
        check = output._content_check  # type: ignore[attr-defined]
        if check.unenforced:
            relaxed.append(name)
    assert rejected == []
    assert len(relaxed) >= 9  # the 9 schemas strict mode rejects (not, dependencies, oneOf, format: path)


def test_strict_rejects_what_it_cannot_enforce_naming_it(smol: LLMClient, corpus: Path) -> None:
    schema = json.loads((corpus / "Glaiveai2K" / "calculate_area_08e029cf.json").read_text())
    with pytest.raises(InvalidRequestError, match="dependencies") as info:
        smol.chat.completions.create(messages=[{"role": "user", "content": "hi"}], response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert info.value.param == "response_format"


def test_jsonschemabench_sample_is_valid_at_every_finish(smol: LLMClient, corpus: Path) -> None:
    reasons = []
    for _name, schema in corpus_sample(corpus, every=48):  # 5 schemas across the folders
        fmt = {"type": "json_schema", "json_schema": {"name": "example", "schema": schema}}
        try:
            response = smol.chat.completions.create(
                messages=[{"role": "user", "content": "Write one realistic example JSON document."}],
                response_format=fmt, max_tokens=64)
        except InvalidRequestError as exc:  # below the shortest valid reply: said before generating
            assert exc.param == "max_tokens" and "shortest valid one takes" in str(exc), exc
            reasons.append("rejected")
            continue
        choice = response.choices[0]
        if choice.message.schema_violations:  # only keywords the grammar could not enforce
            json.loads(choice.message.content or "")
        else:
            validate(choice.message.content or "", schema)
        reasons.append(choice.finish_reason)
    assert len(reasons) == 5 and "length" in reasons, reasons  # cut replies are proven valid too


def test_forced_calls_on_glaive_schemas_are_valid(smol: LLMClient, corpus: Path) -> None:
    count = 0
    for path in sorted((corpus / "Glaiveai2K").glob("*.json"))[::40]:
        schema = json.loads(path.read_text())
        name = re.sub(r"_[0-9a-f]{8}$", "", path.stem)
        tools = [{"type": "function", "function": {"name": name, "parameters": schema}}]
        response = smol.chat.completions.create(
            messages=[{"role": "user", "content": f"Call {name} with realistic arguments."}],
            tools=tools, tool_choice={"type": "function", "function": {"name": name}}, max_tokens=128)
        choice = response.choices[0]
        assert [c.function.name for c in choice.message.tool_calls] == [name]
        if not choice.message.schema_violations:
            validate(choice.message.tool_calls[0].function.arguments, schema)
        count += 1
    assert count == 3


def test_unsupported_schema_names_the_reason(smol: LLMClient) -> None:
    with pytest.raises(InvalidRequestError, match="oneOf") as info:
        smol.chat.completions.create(
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
                "oneOf": [{"type": "integer"}, {"type": "number"}]}}})
    assert info.value.param == "response_format"


def test_a_repeated_schema_is_compiled_once(smol: LLMClient) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"const": "cache-test"}},
              "required": ["n", "tag"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    smol.chat.completions.create(messages=[{"role": "user", "content": "A number."}], response_format=fmt,
                                 max_tokens=16)
    misses = grammar_cache.misses
    response = smol.chat.completions.create(messages=[{"role": "user", "content": "Another number."}],
                                            response_format=fmt, max_tokens=16)
    assert grammar_cache.misses == misses
    validate(response.choices[0].message.content or "", schema)


def test_gemma_large_vocabulary(gemma: LLMClient) -> None:
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["colour", "count"]}
    response = gemma.chat.completions.create(
        messages=[{"role": "user", "content": "Pick a colour and a count."}], max_tokens=30,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
    assert response.choices[0].finish_reason == "stop"
    validate(response.choices[0].message.content or "", schema)
    text = gemma.chat.completions.create(messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
                                         tools=[{"type": "function", "function": {"name": "noop"}}],
                                         tool_choice="none")
    assert text.choices[0].message.tool_calls is None


def test_usage_counts_the_tool_prompt(smol: LLMClient) -> None:
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    plain = smol.chat.completions.create(messages=ask, max_tokens=1)
    with_tools = smol.chat.completions.create(messages=ask, tools=tools, tool_choice="required",
                                              max_tokens=40)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 40  # the schemas are in the prompt
    assert with_tools.choices[0].message.tool_calls[0].function.name == "get_weather"
