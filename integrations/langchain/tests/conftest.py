"""Shared settings for the LangChain adapter's tests.

Real-model tests use the embedded SmolLM2 on llama.cpp, loaded once per session: every
``ChatLocalLLMKit`` built with the same load settings shares that loaded model (the client
shares engines), so LangChain's standard suite may build its model per test at no cost.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

logger = logging.getLogger(__name__)

# Load settings shared by every real-model test (one engine for all of them); the standard suite's
# file repeats them, since test modules cannot import each other under --import-mode=importlib.
REAL_MODEL: dict[str, Any] = {"model": "smollm2-135m-instruct", "backend": "llama.cpp", "context_length": 2048,
                              "n_threads": 1}


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


_PROBE = ("import sys, llama_cpp; m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False); "
          "m.eval(m.tokenize(b'hello there, friend'))")


@pytest.fixture(scope="session", autouse=True)
def _llama_cpp_without_crashing_weight_buffers() -> None:
    """Work around a llama.cpp crash on machines whose CPU reports AMX but cannot use it.

    On this project's development VM (Firecracker, AMX-capable Xeon), llama-cpp-python 0.3.36
    repacks Q4 weights into its AMX "extra buffer type", and then any batch of two or more
    tokens dies with SIGSEGV in ``llama_decode``. A throw-away process probes for that; only when
    it crashes are extra buffer types turned off (``llama_model_params.use_extra_bufts=False``)
    for this test session. The real fix belongs in local_llm_kit's llama.cpp backend.
    """
    try:
        import llama_cpp

        from local_llm_kit import LLMClient
    except ImportError:
        return
    path = str(LLMClient(REAL_MODEL["model"]).resolved_model.path)
    probe = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, timeout=300, check=False)
    if probe.returncode >= 0:
        return
    logger.warning("llama.cpp crashed (signal %d) on a batched decode: disabling extra buffer types",
                   -probe.returncode)
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
