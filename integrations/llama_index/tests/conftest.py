"""Fixtures of the LlamaIndex integration's tests: real packaged models, loaded once per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from llama_index.llms.local_llm_kit import LocalLLMKit


@pytest.fixture(scope="session")
def llk_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """LOCAL_LLM_KIT_CACHE_DIR when set (re-used GGUF conversions), else a fresh folder."""
    configured = os.environ.get("LOCAL_LLM_KIT_CACHE_DIR")
    return str(Path(configured) if configured else tmp_path_factory.mktemp("llk-cache"))


def loaded(llm: LocalLLMKit) -> LocalLLMKit:
    """``llm`` with its weights loaded now, as a user's first call would load them."""
    llm.client.load()
    return llm


@pytest.fixture(scope="session")
def load_llm() -> Callable[[LocalLLMKit], LocalLLMKit]:
    """Loads an LLM's model now."""
    return loaded


@pytest.fixture(scope="session")
def llama_cpp_llm(llk_cache_dir: str) -> LocalLLMKit:
    """SmolLM2 on llama.cpp, greedy, short replies. Tests must not change its fields.

    One thread: on a shared machine llama.cpp's spinning workers collapse when cores are busy.
    """
    return loaded(LocalLLMKit(backend="llama.cpp", temperature=0, max_tokens=40, n_threads=1,
                              cache_dir=llk_cache_dir))


@pytest.fixture(scope="session")
def transformers_llm(llk_cache_dir: str) -> LocalLLMKit:
    return loaded(LocalLLMKit(backend="transformers", temperature=0, max_tokens=40, n_threads=1,
                              cache_dir=llk_cache_dir))
