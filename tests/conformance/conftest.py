"""One suite, both backends: every test here runs on llama.cpp and on transformers."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_llm_kit import LLMClient

BACKENDS = ["llama.cpp", "transformers"]
_ENGINE_MODULE = {"llama.cpp": "llama_cpp", "transformers": "transformers"}
_clients: dict[tuple[str, str], LLMClient] = {}


@pytest.fixture(params=BACKENDS, scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if importlib.util.find_spec(_ENGINE_MODULE[name]) is None:
        pytest.skip(f"the {name} engine is not installed")
    return name


@pytest.fixture(scope="session", autouse=True)
def _close_loaded_clients() -> Iterator[None]:
    """Close the session's clients at its end, while llama.cpp's module is still whole: a model
    freed during interpreter teardown fails in ``Llama.__del__``."""
    yield
    for client in _clients.values():
        client.close()
    _clients.clear()


def load(model: str, backend: str, cache_dir: Path) -> LLMClient:
    """One loaded client per (model, backend) for the whole session."""
    key = (model, backend)
    if key not in _clients:
        _clients[key] = LLMClient(model, backend=backend, temperature=0, cache_dir=cache_dir).load()
    return _clients[key]


@pytest.fixture()
def smol(backend: str, cache_dir: Path) -> LLMClient:
    client = load("smollm2-135m-instruct", backend, cache_dir)
    client.disable_memory()
    return client


@pytest.fixture()
def gemma(backend: str, cache_dir: Path) -> LLMClient:
    client = load("gemma-3-270m", backend, cache_dir)
    client.disable_memory()
    return client
