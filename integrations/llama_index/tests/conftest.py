"""Fixtures of the LlamaIndex integration's tests: real packaged models, loaded once per session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from llama_index.llms.local_llm_kit import LocalLLMKit


@pytest.fixture(scope="session")
def llk_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """LOCAL_LLM_KIT_CACHE_DIR when set (re-used GGUF conversions), else a fresh folder."""
    configured = os.environ.get("LOCAL_LLM_KIT_CACHE_DIR")
    return str(Path(configured) if configured else tmp_path_factory.mktemp("llk-cache"))


@contextlib.contextmanager
def without_weight_repacking() -> Iterator[None]:
    """Load llama.cpp models with ``use_extra_bufts=False``, only while this block runs.

    WORKAROUND, to be removed once the core does it: llama-cpp-python 0.3.36 built here
    segfaults in the first ``eval`` on this Intel Xeon (AVX512/AMX) when weights are repacked
    into the CPU's extra buffer types; plain ``llama_cpp.Llama(...).eval(...)`` crashes the same
    way, so it is not the adapter. The core fix belongs in ``backends/llama_cpp.py``.
    """
    import llama_cpp
    import llama_cpp.llama as llama_module

    original = llama_cpp.llama_model_default_params

    def params():  # type: ignore[no-untyped-def]
        value = original()
        value.use_extra_bufts = False
        return value

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = original


def loaded(llm: LocalLLMKit) -> LocalLLMKit:
    if llm.backend == "llama.cpp":
        with without_weight_repacking():
            llm.client.load()
    else:
        llm.client.load()
    return llm


@pytest.fixture(scope="session")
def load_llm() -> Callable[[LocalLLMKit], LocalLLMKit]:
    """Loads an LLM's model now (with the llama.cpp workaround above)."""
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
