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

pytestmark = pytest.mark.integration
pytest.importorskip("llama_cpp")

CORPUS = Path("/work/shared/data/jsonschemabench")
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="the JSONSchemaBench sample is not here")


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


def corpus_sample(every: int) -> list[tuple[str, Any]]:
    paths = sorted(CORPUS.glob("*/*.json")) if CORPUS.is_dir() else []
    return [(f"{p.parent.name}/{p.name}", json.loads(p.read_text())) for p in paths[::every]]


def validate(text: str, schema: Any) -> None:
    value = json.loads(text)
    jsonschema.validators.validator_for(schema)(schema).validate(value)


@needs_corpus
def test_jsonschemabench_sample_is_valid_or_rejected_clearly(smol: LLMClient) -> None:
    finished = 0
    for name, schema in corpus_sample(every=12):  # 20 schemas across the folders
        fmt = {"type": "json_schema", "json_schema": {"name": "example", "schema": schema}}
        try:
            response = smol.chat.completions.create(
                messages=[{"role": "user", "content": "Write one realistic example JSON document."}],
                response_format=fmt, max_tokens=96)
        except InvalidRequestError as exc:  # the engine's reason, never unconstrained output
            assert exc.param == "response_format" and "cannot be enforced" in str(exc), name
            continue
        if response.choices[0].finish_reason == "stop":
            finished += 1
            validate(response.choices[0].message.content or "", schema)
    assert finished >= 8


@needs_corpus
def test_forced_calls_on_glaive_schemas_are_valid(smol: LLMClient) -> None:
    for path in sorted((CORPUS / "Glaiveai2K").glob("*.json"))[::24]:
        schema = json.loads(path.read_text())
        name = re.sub(r"_[0-9a-f]{8}$", "", path.stem)
        tools = [{"type": "function", "function": {"name": name, "parameters": schema}}]
        try:
            response = smol.chat.completions.create(
                messages=[{"role": "user", "content": f"Call {name} with realistic arguments."}],
                tools=tools, tool_choice={"type": "function", "function": {"name": name}}, max_tokens=128)
        except InvalidRequestError as exc:
            assert exc.param == "tools[0].function.parameters", path.name
            continue
        choice = response.choices[0]
        assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == name
        if choice.finish_reason == "tool_calls":
            validate(choice.message.tool_calls[0].function.arguments, schema)


def test_unsupported_schema_names_the_reason(smol: LLMClient) -> None:
    with pytest.raises(InvalidRequestError, match="oneOf") as info:
        smol.chat.completions.create(
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
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
