"""Servers the remote backend is tested against, all on free loopback ports.

* our own server (``local_llm_kit.server`` under uvicorn, in a thread) serving SmolLM2 on llama.cpp;
* llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``, its ``server``
  extra) serving the same GGUF file, in a subprocess: an engine nobody here wrote.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_llm_kit import LLMClient

pytest.importorskip("uvicorn", reason="the remote tests need the 'server' extra")

from local_llm_kit import AsyncLLMClient
from local_llm_kit.server import ServerLimits
from tests.server.conftest import RunningServer, running_server

MODEL = "smollm2-135m-instruct"
KEY = "remote-key"

# llama-cpp-python's server, started with AMX weight repacking off: on CPUs with AMX, llama.cpp's
# AMX buffer type crashes in ggml_backend_amx_mul_mat (ggml-org/llama.cpp#20824). The server has no
# option for it, so the model-parameter default is set before the server module loads.
_LLAMA_CPP_SERVER = """
import sys
import llama_cpp
_defaults = llama_cpp.llama_model_default_params
def _no_extra_buffers():
    params = _defaults()
    params.use_extra_bufts = False
    return params
llama_cpp.llama_model_default_params = _no_extra_buffers
from llama_cpp.server.__main__ import main
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="session")
def our_server(cache_dir: Path) -> Iterator[RunningServer]:
    pytest.importorskip("llama_cpp")
    client = AsyncLLMClient(MODEL, backend="llama.cpp", temperature=0, cache_dir=cache_dir, n_threads=1)
    _ = client.engine
    with running_server(client, api_key=KEY, limits=ServerLimits(max_queue=64)) as server:
        yield server


@pytest.fixture()
def smol(our_server: RunningServer) -> Iterator[LLMClient]:
    """SmolLM2 through backend="openai" against our server (greedy by default, as in conformance)."""
    client = LLMClient(MODEL, backend="openai", base_url=our_server.base_url, api_key=KEY, temperature=0)
    yield client
    client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def llama_cpp_server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m llama_cpp.server`` serving the embedded SmolLM2 GGUF; yields its base URL."""
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed")
    import httpx

    from local_llm_kit.models import resolve_model

    gguf = resolve_model(MODEL, None, cache_dir, default=MODEL).path
    port = _free_port()
    command = [sys.executable, "-c", _LLAMA_CPP_SERVER, "--model", str(gguf), "--model_alias", MODEL,
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
               "--verbose", "False"]
    log = tmp_path_factory.mktemp("llama-cpp-server") / "server.log"
    with log.open("wb") as sink:  # a file, not a pipe: a full pipe would block the server
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
