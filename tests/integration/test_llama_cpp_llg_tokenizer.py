"""The llama.cpp backend's llguidance tokenizer: what llguidance's own builder makes, without its warnings.

llguidance's ``lltokenizer_from_vocab`` calls llama-cpp-python's deprecated ``llama_token_get_attr``
once per vocabulary entry: a DeprecationWarning for each of Gemma's 262k tokens. The backend builds
the same tokenizer through ``llama_vocab_get_attr``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from local_llm_kit import LLMClient

pytestmark = pytest.mark.integration
pytest.importorskip("llama_cpp")

MODELS = ["gemma-3-270m", "smollm2-135m-instruct"]


@pytest.fixture(scope="module", params=MODELS)
def client(request: pytest.FixtureRequest, cache_dir: Path) -> LLMClient:
    # context_length 640: an engine of this module's own, whose llguidance tokenizer is not built yet.
    return LLMClient(request.param, backend="llama.cpp", temperature=0, context_length=640, n_threads=1,
                     cache_dir=cache_dir)


def test_building_the_tokenizer_and_a_constrained_reply_warn_nothing(client: LLMClient) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client.engine.backend.llg_tokenizer()
        reply = client.chat.completions.create(messages=[{"role": "user", "content": "A JSON object, please."}],
                                               response_format={"type": "json_object"}, max_tokens=12)
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert deprecations == []


def test_the_tokenizer_equals_llguidances_own(client: LLMClient) -> None:
    from llguidance.llamacpp import lltokenizer_from_vocab

    backend = client.engine.backend
    ours = backend.llg_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the warnings this replaces
        theirs = lltokenizer_from_vocab(backend._vocab, n_vocab=backend.info.n_vocab,  # type: ignore[attr-defined]
                                        eos_token=sorted(backend.info.eos_token_ids))
    assert ours.vocab_size == theirs.vocab_size
    assert ours.eos_tokens == theirs.eos_tokens
    for token in range(ours.vocab_size):
        assert ours.is_special_token(token) == theirs.is_special_token(token), token
        assert ours.decode_bytes([token]) == theirs.decode_bytes([token]), token
    text = 'Hello <start_of_turn> {"a": [1, 2]}\n<|im_start|>ünïcode 日本語'
    assert ours.tokenize_str(text) == theirs.tokenize_str(text)
