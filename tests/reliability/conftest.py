"""Fixtures of the reliability suite: the real SmolLM2 on llama.cpp, loaded once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from local_llm_kit import LLMClient
from tests.reliability.support import MODEL, greedy_answer, private_client


@pytest.fixture(scope="session")
def smol(cache_dir: Path) -> Iterator[LLMClient]:
    """The embedded SmolLM2 on llama.cpp, loaded once for the reliability suite."""
    client = LLMClient(MODEL, backend="llama.cpp", temperature=0, cache_dir=cache_dir).load()
    yield client
    client.close()  # unloads the model unless other tests' clients still hold it


@pytest.fixture(scope="session")
def smol_reference(smol: LLMClient) -> str:
    """The greedy answer to GREEDY_QUESTION from a freshly loaded engine (nothing run on it before)."""
    fresh = private_client(smol)
    try:
        return greedy_answer(fresh)
    finally:
        fresh.engine.close()
