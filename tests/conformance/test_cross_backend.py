"""Both backends on the same GGUF agree on greedy decoding, up to quantized-kernel noise.

llama.cpp computes with the quantized weights; transformers with the same weights dequantized
to float. Where two candidates are nearly tied the backends may pick differently, so the test
asserts what always holds (each backend's first token is among the other's top 3) and that most
prompts agree on their first tokens; the measured rate is printed for the README.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conformance.conftest import load

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                       or importlib.util.find_spec("llama_cpp") is None, reason="needs both engines"),
]

PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis briefly.",
    "List three programming languages.", "How do I boil an egg?", "Translate hello into Spanish.",
    "What is 2+2?", "Name a famous painter.", "Give me a tip for better sleep.", "What is a prime number?",
]
N_TOKENS = 8


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_greedy_decoding_agrees_across_backends(model: str, cache_dir: Path) -> None:
    llama = load(model, "llama.cpp", cache_dir)
    torch_ = load(model, "transformers", cache_dir)
    first_token_agreements = 0
    prefix_lengths = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        assert llama.count_tokens(messages) == torch_.count_tokens(messages)  # same prompt ids
        a, b = (c.chat.completions.create(messages=messages, max_tokens=N_TOKENS, logprobs=True, top_logprobs=3)
                for c in (llama, torch_))
        ta = a.choices[0].logprobs.content  # type: ignore[union-attr]
        tb = b.choices[0].logprobs.content  # type: ignore[union-attr]
        assert ta[0].token in [t.token for t in tb[0].top_logprobs]
        assert tb[0].token in [t.token for t in ta[0].top_logprobs]
        first_token_agreements += ta[0].token == tb[0].token
        n = 0
        while n < min(len(ta), len(tb)) and ta[n].token == tb[n].token:
            n += 1
        prefix_lengths.append(n)
    rate = first_token_agreements / len(PROMPTS)
    print(f"\n{model}: first-token agreement {rate:.0%}, common greedy prefix {prefix_lengths} of {N_TOKENS}")
    assert rate >= 0.7
