"""The closing search and the shortest-reply estimate over the whole JSONSchemaBench corpus, with both
packaged tokenizers.

Tokenizer only (no forward pass) but for one request per model at the end. For every schema, the search
must complete the reply from the grammar's start (the shortest-reply estimate behind the ``max_tokens``
check, and the first path the decode loop steers to) and from states a model leaves it in: inside
each string value of that reply after a few characters of its own (``x``, ``1``, ``a.``, ``a@``...),
where a ``pattern`` or ``format`` may forbid the closing quote until the right characters come (an
e-mail address, a timestamp required somewhere in the string, a domain name). And a ``max_tokens``
equal to the estimate must give a valid reply, whatever the model proposes: the decode loop's
constraint calls are replayed here with "models" that propose the worst tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import numpy as np
import pytest

from local_llm_kit import InvalidRequestError, LLMClient
from local_llm_kit.closing import closer_for
from local_llm_kit.constraints import CompiledGrammar, GrammarConstraint, grammar_cache, json_schema_grammar
from local_llm_kit.request import validate_request
from local_llm_kit.schemas import enforce
from local_llm_kit.structured import select_output_mode

pytestmark = pytest.mark.integration
pytest.importorskip("llama_cpp")

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "jsonschemabench"
MODELS = ["smollm2-135m-instruct", "gemma-3-270m"]
# What a model may have written inside a string before the budget runs out.
MODEL_TEXT = [b"x", b"1", b"Ab-", b"a.", b"a@", b"20"]


def llama_cpp_client(model: str, cache_dir: Path) -> LLMClient:
    client = LLMClient(model, backend="llama.cpp", context_length=1536, kv_slots=1, n_threads=1, temperature=0,
                       cache_dir=cache_dir)
    client.disable_memory()
    return client


@pytest.fixture(scope="module", params=MODELS)
def client(request: pytest.FixtureRequest, cache_dir: Path) -> Iterator[LLMClient]:
    client = llama_cpp_client(request.param, cache_dir)
    yield client
    client.close()


@pytest.fixture(scope="module")
def smol(cache_dir: Path) -> Iterator[LLMClient]:
    """SmolLM2 alone, for the one test that generates (the others need tokenizers only)."""
    client = llama_cpp_client("smollm2-135m-instruct", cache_dir)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tokenizer(client: LLMClient) -> tuple[llguidance.LLTokenizer, Any]:
    backend = client.engine.backend
    return backend.llg_tokenizer(), backend.info


def schema_of(name: str) -> Any:
    return json.loads(next(CORPUS.glob(f"*/{name}.json")).read_text())


def corpus_grammars(tokenizer: llguidance.LLTokenizer, *,
                    enforced: dict[str, Any] | None = None) -> list[tuple[str, CompiledGrammar]]:
    assert CORPUS.is_dir(), f"the JSONSchemaBench corpus is missing: expected it at {CORPUS}"
    paths = sorted(CORPUS.glob("*/*.json"))
    assert len(paths) == 240, f"expected the 240 schemas of the corpus, found {len(paths)}"

    def compile_error(schema: Any) -> str | None:
        return grammar_cache.error(tokenizer, json_schema_grammar(schema))

    grammars = []
    for path in paths:  # as a non-strict request compiles it (what the grammar cannot enforce is left out)
        check = enforce(json.loads(path.read_text()), strict=False, compile_error=compile_error, param="schema")
        if enforced is not None:  # the schema, when the grammar enforces all of it
            enforced[path.stem] = None if check.unenforced else check.grammar_schema
        grammars.append((path.stem, grammar_cache.compile(tokenizer, json_schema_grammar(check.grammar_schema),
                                                          param="schema")))
    return grammars


def scan(tokenizer: llguidance.LLTokenizer, info: Any) -> tuple[list[str], list[str], int]:
    """Schemas with no completion from the start; (schema, state) pairs with none from inside a
    string; how many states were searched."""
    closer = closer_for(tokenizer)
    excluded = frozenset(info.eos_token_ids) | frozenset(tokenizer.eos_tokens)
    limit = min(info.n_vocab, tokenizer.vocab_size)
    from_start: list[str] = []
    inside: list[str] = []
    searched = 0
    for name, grammar in corpus_grammars(tokenizer):
        path = grammar.shortest_reply(info.n_vocab, info.eos_token_ids)
        searched += 1
        if path is None:
            from_start.append(name)
            continue
        matcher = grammar.matcher()
        for i, token in enumerate(path):
            assert matcher.consume_token(token)
            # Just after a quote (one that opens a string or a key; after a closing one, nothing is taken).
            if not tokenizer.decode_bytes(list(path[: i + 1])).endswith(b'"'):
                continue
            for written in MODEL_TEXT:
                tokens = list(tokenizer.tokenize_bytes(written))
                taken = matcher.validate_tokens(tokens)
                if taken == 0:
                    continue
                assert matcher.consume_tokens(tokens[:taken])
                searched += 1
                if closer.complete(matcher, excluded, limit, tails=grammar.tails) is None:
                    inside.append(f"{name}: {tokenizer.decode_bytes(list(path[: i + 1]) + tokens[:taken])!r}")
                matcher.rollback(taken)
    return from_start, inside, searched


def test_the_closer_completes_every_corpus_schema(tokenizer: tuple[llguidance.LLTokenizer, Any]) -> None:
    from_start, inside, searched = scan(*tokenizer)
    assert searched - 240 > 200  # states inside strings
    assert from_start == []  # 240 of 240: the five with an e-mail or a pattern included
    assert inside == []


# -- a budget equal to the estimate ------------------------------------------------------------
def decode(grammar: CompiledGrammar, info: Any, propose: Callable[[list[int]], int], max_tokens: int) -> list[int]:
    """The decode loop's constraint calls (check, mask, fit, consume) with a model that proposes
    ``propose(tokens so far)``; a token the grammar rejects is replaced by the lowest allowed id, as a
    masked argmax of equal logits would. Returns the reply's tokens."""
    constraint = GrammarConstraint(grammar, info.n_vocab, info.eos_token_ids)
    logits = np.zeros(info.n_vocab, dtype=np.float32)
    out: list[int] = []
    while len(out) < max_tokens:
        token = propose(out)
        if not constraint.allows(token):
            logits[:] = 0
            constraint.mask_logits(logits)
            token = int(np.flatnonzero(logits == 0)[0])
        fitted = constraint.fit(token, max_tokens - len(out))
        if fitted is None or fitted in info.eos_token_ids:
            break
        out.append(fitted)
        out += constraint.consume(fitted)[: max_tokens - len(out)]
        if constraint.is_complete():
            break
    return out


def test_a_budget_equal_to_the_estimate_gives_a_valid_reply(tokenizer: tuple[llguidance.LLTokenizer, Any]) -> None:
    # The estimate is the length of a path the decode loop steers to: a model that writes "x" wherever
    # it may (into optional keys, long strings) or the lowest token id the grammar allows is steered
    # back onto it, for every schema of the corpus.
    tok, info = tokenizer
    x = int(tok.tokenize_bytes(b"x")[0])
    models: dict[str, Callable[[list[int]], int]] = {"x": lambda out: x, "lowest allowed": lambda out: info.n_vocab}
    enforced: dict[str, Any] = {}
    failures = []
    end = tok.eos_tokens[0]
    for i, (name, grammar) in enumerate(corpus_grammars(tok, enforced=enforced)):
        estimate = grammar.min_tokens(info.n_vocab, info.eos_token_ids)
        assert estimate is not None, name
        for model, propose in list(models.items())[: 1 + i % 2]:  # the second model on every other schema
            out = decode(grammar, info, propose, estimate)
            text = tok.decode_str(out)
            assert len(out) <= estimate
            try:
                value = json.loads(text)
                if enforced[name] is not None:  # the grammar enforces the whole schema: jsonschema agrees
                    jsonschema.validators.validator_for(enforced[name])(enforced[name]).validate(value)
            except (ValueError, jsonschema.ValidationError) as exc:
                failures.append(f"{name} ({model}, max_tokens={estimate}): {text!r}: {exc}")
            if grammar.matcher().validate_tokens([*out, end]) != len(out) + 1:
                failures.append(f"{name} ({model}, max_tokens={estimate}): {text!r} not accepted by the grammar")
    assert failures == []


def test_tool_calls_at_the_estimate_are_complete(client: LLMClient) -> None:
    # Several tools: the estimate is the shortest single call among them (each searched alone), and
    # the decode loop runs the grammar of all the calls; the path must be one it can follow.
    backend = client.engine.backend
    tok, info = backend.llg_tokenizer(), backend.info
    x = int(tok.tokenize_bytes(b"x")[0])
    paths = sorted((CORPUS / "Glaiveai2K").glob("*.json"))[:24]
    failures = []
    for i in range(0, len(paths), 3):
        tools = [{"type": "function", "function": {"name": f"f{j}", "parameters": json.loads(p.read_text())}}
                 for j, p in enumerate(paths[i:i + 3])]
        for choice in ("required", "auto"):
            request = validate_request({"messages": [{"role": "user", "content": "Go."}], "tools": tools,
                                        "tool_choice": choice}, default_temperature=0.0, default_top_p=1.0,
                                       n_vocab=info.n_vocab)
            grammar = select_output_mode(client.engine, request)._grammar  # type: ignore[attr-defined]
            estimate = grammar.min_tokens(info.n_vocab, info.eos_token_ids)
            out = decode(grammar, info, lambda out: x, estimate)
            end = tok.eos_tokens[0]
            if len(out) > estimate or grammar.matcher().validate_tokens([*out, end]) != len(out) + 1:
                failures.append(f"{[p.stem for p in paths[i:i + 3]]} {choice}: {tok.decode_str(out)!r}")
    assert failures == []


# Valid replies written by hand (the shortest we could think of, and a realistic one): the estimate
# may not be above their token count with either tokenizer.
BY_HAND = {
    "o60319": ['{"tests": {}, "testsuite": ""}', '{"tests": {"t1": {"fname": "a.c"}}, "testsuite": "ltp"}'],
    "o83807": ['{"type": ""}', '{"type": "MORALE"}'],
    "sp_408_Normalized": ['{"deviceClass": "Robot"}', '{"deviceClass": "Phone"}'],
    "o12617": ['{"created": "2020-01-01T00:00:00.000000", "description": "", "id": 0, '
               '"modified": "2020-01-01T00:00:00.000000", "name": "", "resource_uri": ""}'],
    "generate_invoice_bf2487f2": ['{"customer_email": "a@b.co", "customer_name": "", "items": []}'],
    "o41049": ['{"domain": "a.co", "selector": "", "url": ""}'],
}


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_the_estimate_is_not_above_a_reply_written_by_hand(tokenizer: tuple[llguidance.LLTokenizer, Any],
                                                            name: str) -> None:
    tok, info = tokenizer
    schema = schema_of(name)
    check = enforce(schema, strict=False, compile_error=lambda s: grammar_cache.error(tok, json_schema_grammar(s)),
                    param="schema")
    grammar = grammar_cache.compile(tok, json_schema_grammar(check.grammar_schema), param="schema")
    estimate = grammar.min_tokens(info.n_vocab, info.eos_token_ids)
    assert estimate is not None
    for reply in BY_HAND[name]:
        jsonschema.validate(json.loads(reply), schema, format_checker=jsonschema.FormatChecker())
        tokens = tok.tokenize_str(reply)
        end = tok.eos_tokens[0]
        assert grammar.matcher().validate_tokens([*tokens, end]) == len(tokens) + 1  # the grammar takes it whole
        assert estimate <= len(tokens), (reply, estimate, len(tokens))


def test_max_tokens_at_the_estimate_is_served_and_one_less_is_refused(smol: LLMClient) -> None:
    # o60319 was estimated at 89 tokens (the greedy search wrote the optional "scm_url_base" first and
    # looped in its URI), so max_tokens 64 was refused though `{"tests": {}, "testsuite": ""}` is 9-10.
    schema = schema_of("o60319")
    fmt = {"type": "json_schema", "json_schema": {"name": "testsuite", "schema": schema}}
    messages = [{"role": "user", "content": "Describe the LTP test suite as JSON."}]
    client = smol
    tok = client.engine.backend.llg_tokenizer()
    shortest = len(tok.tokenize_str('{"tests": {}, "testsuite": ""}'))
    with pytest.raises(InvalidRequestError) as refused:
        client.chat.completions.create(messages=messages, response_format=fmt, max_tokens=shortest - 1)
    assert refused.value.param == "max_tokens"
    assert f"takes {shortest} tokens" in str(refused.value)
    for max_tokens in (shortest, 64):
        reply = client.chat.completions.create(messages=messages, response_format=fmt, max_tokens=max_tokens)
        assert reply.usage.completion_tokens <= max_tokens
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
