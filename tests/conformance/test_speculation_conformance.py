"""Prompt-lookup speculation on the packaged models: the same replies as plain decoding, both backends.

Each case runs with ``prompt_lookup`` off, then on, on the same loaded model; the replies (text,
tool calls, finish reason and token counts) must be equal. Drafts are verified in one forward pass
of several positions, where plain decoding evaluates one position per pass, so this also checks
that each backend's multi-position logits agree with its single-position ones closely enough
never to change a greedy choice on these prompts.

That agreement is the engine's. transformers in float32 matches to ~1e-6 at any length; in
bfloat16 (its default on CPUs with native bf16) a batched position's logits differ from a single
one's by up to ~0.5, so those runs use float32 here. llama.cpp on the CPU gives identical logits
with flash attention and one thread; with two threads only while fewer than 256 tokens are cached
(the forced tool call's prompt is 267: its plain and speculative replies then parted at
"123456 Bristol, 12" against "1234567890 Bristol", whichever ran first), so its runs use both;
without flash attention (its default) they differ by up to ~1, and SmolLM2's
free-chat reply at 64 tokens flipped a near-tie ("...of the natural world" against "...of the human
spirit"), just as between a warm turn and a cold prefill (see the README).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from local_llm_kit import LLMClient
from local_llm_kit.speculation import PromptLookup, SpeculationStats
from local_llm_kit.testing import FixedPassCosts

PASSAGE = ("Invoice 4471 was issued on 3 March 2024 to Harbour Supplies Ltd, 12 Quay Street, Bristol, "
           "for 40 crates of lamp oil at 18.50 pounds each, due within 30 days.")
SCHEMA = {
    "type": "object",
    "properties": {"invoice": {"type": "string"}, "customer": {"type": "string"},
                   "address": {"type": "string"}, "items": {"type": "integer"}},
    "required": ["invoice", "customer", "address", "items"], "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {
    "name": "send_reminder", "description": "Send a payment reminder to a customer",
    "parameters": {"type": "object", "properties": {"customer": {"type": "string"}, "address": {"type": "string"}},
                   "required": ["customer", "address"]}}}]

CASES: dict[str, dict[str, Any]] = {
    "free chat": {"messages": [{"role": "user", "content": "Write two sentences about autumn."}]},
    "quote": {"messages": [{"role": "user", "content": f"Repeat this text word for word: {PASSAGE}"}]},
    "json schema": {
        "messages": [{"role": "user", "content": f"Extract the invoice fields as JSON. {PASSAGE}"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "invoice", "schema": SCHEMA}},
    },
    "forced tool call": {
        "messages": [{"role": "user", "content": f"Remind the customer of this invoice: {PASSAGE}"}],
        "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "send_reminder"}},
    },
}


_exact: dict[tuple[str, str], LLMClient] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_exact_clients() -> Iterator[None]:
    yield
    for client in _exact.values():
        client.close()
    _exact.clear()


@pytest.fixture()
def exact_smol(backend: str, smol: LLMClient) -> LLMClient:
    return _exact_client("smollm2-135m-instruct", backend, smol)


@pytest.fixture()
def exact_gemma(backend: str, gemma: LLMClient) -> LLMClient:
    return _exact_client("gemma-3-270m", backend, gemma)


def _exact_client(model: str, backend: str, like: LLMClient) -> LLMClient:
    """A client of the model whose batched logits match single positions' (see the module docstring)."""
    if (model, backend) not in _exact:
        options: dict[str, Any] = ({"flash_attn": True, "n_threads": 1} if backend == "llama.cpp"
                                   else {"dtype": "float32"})
        client = LLMClient(model, backend=backend, temperature=0, cache_dir=like.settings.cache_dir,
                           **options).load()
        # Every draft is verified, whatever a pass costs on this machine: verification is what is tested.
        client.engine.pass_costs = FixedPassCosts(extra_share=0.0)
        _exact[(model, backend)] = client
    return _exact[(model, backend)]


def reply(client: LLMClient, *, copies: bool = False, **params: Any) -> dict[str, Any]:
    """The reply's content, calls, finish reason and length; ``copies``: drafts must have been verified."""
    PromptLookup.stats = stats = SpeculationStats()
    try:
        response = client.chat.completions.create(max_tokens=48, **params)
    finally:
        PromptLookup.stats = None
    if copies:
        assert stats.verifications > 0, "drafts were verified"
    choice = response.choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    assert response.usage is not None
    return {"content": choice.message.content, "calls": calls, "finish": choice.finish_reason,
            "tokens": response.usage.completion_tokens}


@pytest.mark.parametrize("case", list(CASES))
def test_smollm2_replies_are_the_same_with_prompt_lookup(exact_smol: LLMClient, case: str) -> None:
    plain = reply(exact_smol, prompt_lookup=False, **CASES[case])
    assert reply(exact_smol, prompt_lookup=True, copies=case != "free chat", **CASES[case]) == plain


@pytest.mark.parametrize("case", ["quote", "forced tool call"])
def test_gemma_replies_are_the_same_with_prompt_lookup(exact_gemma: LLMClient, case: str) -> None:
    plain = reply(exact_gemma, prompt_lookup=False, **CASES[case])
    assert reply(exact_gemma, prompt_lookup=True, copies=True, **CASES[case]) == plain


def test_seeded_sampling_is_reproducible_with_prompt_lookup(exact_smol: LLMClient) -> None:
    params = {**CASES["quote"], "temperature": 0.8, "top_p": 0.95, "seed": 11, "prompt_lookup": True}
    first, second = reply(exact_smol, copies=True, **params), reply(exact_smol, **params)
    assert first == second
    assert first["tokens"] > 8


def test_a_verification_pass_returns_the_rows_asked_for(exact_smol: LLMClient) -> None:
    # The decode loop asks only for the rows it reads (this step's, and each drafted position
    # whose next token is sampled, not forced by a grammar); they must be those positions' rows.
    backend = exact_smol.engine.backend
    tokens = backend.tokenize(PASSAGE)
    n = len(tokens)
    backend.clear_cache()
    every = backend.forward_all(tokens)
    assert every.shape == (n, backend.info.n_vocab)
    for rows in ([n - 3, n - 2, n - 1], [n - 9, n - 4, n - 3, n - 1]):
        backend.clear_cache()
        some = backend.forward_all(tokens, rows=rows)
        assert some.shape == (len(rows), backend.info.n_vocab)
        np.testing.assert_allclose(some, every[rows], rtol=0, atol=1e-3)
        assert list(some.argmax(axis=1)) == list(every[rows].argmax(axis=1))
    for bad in ([4], [2, 1], []):
        backend.clear_cache()
        with pytest.raises(ValueError, match="rows"):
            backend.forward_all(tokens[:4], rows=bad)
        assert list(backend.cached_tokens) == []  # refused before anything was evaluated
