"""Servers for the tests: our app under a real uvicorn, on a free loopback port, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from local_llm_kit import AsyncLLMClient

pytest.importorskip("uvicorn", reason="the server tests need the 'server' extra")

import uvicorn

from local_llm_kit.server import ServerLimits, create_app


class RunningServer:
    def __init__(self, server: uvicorn.Server, thread: threading.Thread, port: int, app: Any) -> None:
        self.server = server
        self.thread = thread
        self.port = port
        self.app = app
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = self.url + "/v1"


@contextmanager
def running_server(models: AsyncLLMClient | Sequence[AsyncLLMClient], *, api_key: str | None = None,
                   limits: ServerLimits | None = None) -> Iterator[RunningServer]:
    """Serve ``models`` on 127.0.0.1:<free port> until the block ends."""
    app = create_app(models, api_key=api_key, limits=limits)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(server, thread, port, app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def smol_server(cache_dir: Path) -> Iterator[RunningServer]:
    """The embedded SmolLM2 on llama.cpp, served for the whole session (greedy by default)."""
    pytest.importorskip("llama_cpp")
    client = AsyncLLMClient("smollm2-135m-instruct", backend="llama.cpp", temperature=0, cache_dir=cache_dir,
                            n_threads=1)
    _ = client.engine
    with running_server(client, api_key="test-key", limits=ServerLimits(max_queue=64)) as server:
        yield server
