"""Shared settings for the LangChain adapter's tests.

Real-model tests use the embedded SmolLM2 on llama.cpp, loaded once per session: every
``ChatLocalLLMKit`` built with the same load settings shares that loaded model (the client
shares engines), so LangChain's standard suite may build its model per test at no cost.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

# Load settings shared by every real-model test (one engine for all of them); the standard suite's
# file repeats them, since test modules cannot import each other under --import-mode=importlib.
REAL_MODEL: dict[str, Any] = {"model": "smollm2-135m-instruct", "backend": "llama.cpp", "context_length": 2048}


@pytest.fixture(scope="session")
def real_model() -> Any:
    """The embedded SmolLM2 on llama.cpp, greedy, loaded once."""
    from langchain_local_llm_kit import ChatLocalLLMKit

    model = ChatLocalLLMKit(**REAL_MODEL, temperature=0, max_tokens=48)
    model.sync_client.load()
    return model


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No LOCAL_LLM_KIT_* setting leaks in, except the shared cache dir."""
    for name in ("LOCAL_LLM_KIT_MODEL_PATH", "LOCAL_LLM_KIT_BACKEND", "LOCAL_LLM_KIT_CONTEXT_LENGTH"):
        monkeypatch.delenv(name, raising=False)
    if not os.environ.get("LOCAL_LLM_KIT_CACHE_DIR"):
        monkeypatch.setenv("LOCAL_LLM_KIT_CACHE_DIR", os.path.expanduser("~/.cache/local_llm_kit"))
    yield
