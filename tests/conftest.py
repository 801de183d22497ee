"""Shared fixtures. Integration tests load the real packaged models once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# llama.cpp and torch share libgomp, which reads this once, when the first of them loads (during
# collection). The default spins waiting threads, which on a shared 2-core machine starved the
# decoding thread (12 greedy tokens took 45-90 s instead of 3 s). Benchmarks set their own.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache dir integration tests share (converted models, assembled Gemma).

    LOCAL_LLM_KIT_CACHE_DIR, when set, is used so repeated runs reuse conversions.
    """
    configured = os.environ.get("LOCAL_LLM_KIT_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("llk-cache")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests see no LOCAL_LLM_KIT_* settings but the cache dir unless they set them."""
    for name in ("LOCAL_LLM_KIT_MODEL_PATH", "LOCAL_LLM_KIT_BACKEND", "LOCAL_LLM_KIT_CONTEXT_LENGTH"):
        monkeypatch.delenv(name, raising=False)
    yield
