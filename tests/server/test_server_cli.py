"""``local-llm-kit serve`` as a user runs it: a process that loads the model, listens, answers, stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_serve_command(cache_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "serve.log"
    env = {**os.environ, "LOCAL_LLM_KIT_CACHE_DIR": str(cache_dir), "LOCAL_LLM_KIT_API_KEY": "cli-key"}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "local_llm_kit", "serve", "--port", str(port), "--temperature", "0",
             "--n-threads", "1", "--log-level", "warning"], stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from LOCAL_LLM_KIT_API_KEY
        reply = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer cli-key"}, timeout=120,
                           json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert reply.status_code == 200 and reply.json()["model"] == "smollm2-135m-instruct"
        assert "Serving smollm2-135m-instruct on http://127.0.0.1" in log.read_text()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(timeout=30) == 0, log.read_text()[-2000:]
        finally:
            if process.poll() is None:
                process.kill()
