"""A model that never ends on its own: a random-weight Llama on the transformers backend.

Built in the test from a tiny config and SmolLM2's packaged tokenizer (chat template included),
it writes noise until ``max_tokens``: the worst case for structured output. Tool calls must still
come back complete and schema-valid, a named ``tool_choice`` exactly one call, ``required`` at
most the documented bound, streamed or not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from local_llm_kit import LLMClient
from local_llm_kit.tools import MAX_PARALLEL_CALLS

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TRIP = {"type": "object", "properties": {"destination": {"type": "string"}, "nights": {"type": "integer"},
                                         "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["destination", "nights", "tags"]}
TOOLS = [{"type": "function", "function": {"name": "book_trip", "parameters": TRIP}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Book me a trip to Lisbon."}]


@pytest.fixture(scope="module")
def looping(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LLMClient:
    smol = LLMClient("smollm2-135m-instruct", backend="transformers", cache_dir=cache_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smol.engine.backend.info.extra["folder"],
                                                           local_files_only=True)
    folder = tmp_path_factory.mktemp("random-llama")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048, tie_word_embeddings=True,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    client = LLMClient(str(folder), backend="transformers", temperature=0, cache_dir=cache_dir, dtype="float32")
    client.disable_memory()
    return client


def reply(client: LLMClient, **kwargs: Any) -> tuple[Any, list[list[str]]]:
    whole = client.chat.completions.create(messages=ASK, tools=TOOLS, **kwargs)
    calls: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(messages=ASK, tools=TOOLS, stream=True, **kwargs):
        for part in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(part.index, ["", ""])
            entry[0] += part.function.name or ""
            entry[1] += part.function.arguments or ""
    return whole, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("max_tokens", [48, 120])
def test_named_choice_gives_one_complete_call(looping: LLMClient, max_tokens: int) -> None:
    whole, streamed = reply(looping, tool_choice={"type": "function", "function": {"name": "book_trip"}},
                            max_tokens=max_tokens)
    calls = whole.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["book_trip"]
    jsonschema.validate(json.loads(calls[0].function.arguments), TRIP)
    assert streamed == [[c.function.name, c.function.arguments] for c in calls]


@pytest.mark.parametrize("max_tokens", [48, 200])
def test_required_gives_complete_calls_within_the_bound(looping: LLMClient, max_tokens: int) -> None:
    whole, streamed = reply(looping, tool_choice="required", max_tokens=max_tokens)
    calls = whole.choices[0].message.tool_calls
    assert 1 <= len(calls) <= MAX_PARALLEL_CALLS
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert streamed == [[c.function.name, c.function.arguments] for c in calls]
    assert whole.choices[0].finish_reason in ("length", "tool_calls")


def test_json_output_is_complete(looping: LLMClient) -> None:
    response = looping.chat.completions.create(
        messages=ASK, max_tokens=40, response_format={"type": "json_schema", "json_schema": {
            "name": "trip", "schema": TRIP}})
    jsonschema.validate(json.loads(response.choices[0].message.content), TRIP)
