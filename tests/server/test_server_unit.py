"""The HTTP layer over a weight-free fake model: protocol, errors, limits, auth, queue, disconnects.

The server is real (uvicorn on loopback) and so is every layer under it; only the model is the
scripted :class:`~local_llm_kit.testing.FakeBackend`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from local_llm_kit import AsyncLLMClient
from local_llm_kit.engine import Engine
from local_llm_kit.errors import InvalidRequestError
from local_llm_kit.models import ResolvedModel
from local_llm_kit.server import ServerLimits, check_bind, is_loopback
from local_llm_kit.testing import FakeBackend, fake_client
from tests.server.conftest import RunningServer, running_server

REPLY = "Hello from the fake model, token by token."
Q = [{"role": "user", "content": "Hi"}]
KEY = "s3cret-key"


class SlowBackend(FakeBackend):
    """A fake model that takes ``delay`` seconds per forward pass and counts them."""

    def __init__(self, reply: str, delay: float) -> None:
        super().__init__(reply)
        self.delay = delay
        self.forwards = 0

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        self.forwards += 1
        time.sleep(self.delay)
        return super().forward(tokens)


def fake(reply: str = REPLY, backend: FakeBackend | None = None) -> AsyncLLMClient:
    client = fake_client(reply, backend=backend, asynchronous=True, temperature=0)
    assert isinstance(client, AsyncLLMClient)
    return client


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with running_server(fake(), api_key=KEY, limits=ServerLimits(max_messages=8, max_n=2, max_tokens=64,
                                                                  max_body_bytes=20_000)) as running:
        yield running


@pytest.fixture()
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    assert error["message"]
    return error


# -- protocol ---------------------------------------------------------------------------------
def test_completion(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"model": "fake-model", "messages": Q})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "fake-model"
    message = body["choices"][0]["message"]
    assert (message["role"], message["content"], message["tool_calls"]) == ("assistant", REPLY, None)
    assert body["usage"]["completion_tokens"] > 0


def test_model_may_be_omitted(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"messages": Q})
    assert response.status_code == 200 and response.json()["model"] == "fake-model"


def test_streaming_events_end_with_done(http: httpx.Client) -> None:
    body = {"model": "fake-model", "messages": Q, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == REPLY
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_models_and_health(server: RunningServer, http: httpx.Client) -> None:
    listed = http.get("/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["fake-model"]
    assert listed["data"][0]["max_model_len"] == 2048
    assert http.get("/v1/models/fake-model").json()["id"] == "fake-model"
    error_of(http.get("/v1/models/other"), 404)
    health = httpx.get(server.url + "/health")  # no key needed
    assert health.json() == {"status": "ok", "generating": 0, "waiting": 0}


def test_every_answer_has_its_own_request_id(server: RunningServer, http: httpx.Client) -> None:
    """OpenAI sends x-request-id on every answer; openai-python shows it as ``._request_id``."""
    answers = [http.post("/v1/chat/completions", json={"messages": Q}),
               http.post("/v1/chat/completions", json={"messages": Q, "temperature": 9}),
               http.get("/v1/models/other"), httpx.get(server.url + "/v1/models"), httpx.get(server.url + "/health")]
    with http.stream("POST", "/v1/chat/completions", json={"messages": Q, "stream": True}) as streamed:
        answers.append(streamed)
    assert [a.status_code for a in answers] == [200, 400, 404, 401, 200, 200]
    ids = [a.headers.get("x-request-id", "") for a in answers]
    assert all(i.startswith("req_") and len(i) == 36 for i in ids), ids
    assert len(set(ids)) == len(ids)


def test_tokenize_counts_exactly(http: httpx.Client) -> None:
    counted = http.post("/tokenize", json={"model": "fake-model", "messages": Q}).json()
    usage = http.post("/v1/chat/completions", json={"messages": Q}).json()["usage"]
    assert counted == {"count": usage["prompt_tokens"], "max_model_len": 2048, "prompt_shaping": []}
    assert error_of(http.post("/tokenize", json={"prompt": "x"}), 400)["param"] == "prompt"


# -- errors -----------------------------------------------------------------------------------
def test_api_key(server: RunningServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}):
        response = httpx.post(server.base_url + "/chat/completions", json={"messages": Q}, headers=headers)
        assert error_of(response, 401)["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    error_of(httpx.get(server.base_url + "/models"), 401)


def test_unknown_model_is_404_and_never_a_path(http: httpx.Client) -> None:
    for model in ("gpt-4o", "/etc/passwd", "smollm2-135m-instruct"):
        error = error_of(http.post("/v1/chat/completions", json={"model": model, "messages": Q}), 404)
        assert error["param"] == "model" and error["code"] == "model_not_found"


def test_unknown_route_and_method(http: httpx.Client) -> None:
    error_of(http.get("/v1/nothing"), 404)
    error_of(http.get("/v1/chat/completions"), 405)


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [1]}, "messages[0]"),
    ({"messages": {"role": "user"}}, "messages"),
    ({}, "messages"),
    ({"messages": Q, "temperature": "hot"}, "temperature"),
    ({"messages": Q, "temperature": 9}, "temperature"),
    ({"messages": Q, "top_p": None, "max_tokens": "10"}, "max_tokens"),
    ({"messages": Q, "max_tokens": 0}, "max_tokens"),
    ({"messages": Q, "stream": "yes"}, "stream"),
    ({"messages": Q, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": Q, "stop": 5}, "stop"),
    ({"messages": Q, "n": 1.5}, "n"),
    ({"messages": Q, "seed": "x"}, "seed"),
    ({"messages": Q, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": Q, "logit_bias": [1]}, "logit_bias"),
    ({"messages": Q, "tools": "x"}, "tools"),
    ({"messages": Q, "tools": [5]}, "tools[0]"),
    ({"messages": Q, "response_format": "json"}, "response_format"),
    ({"messages": Q, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": Q, "model": 3}, "model"),
    ({"messages": Q, "audio": {"voice": "x"}}, "audio"),
    ({"messages": Q, "frobnicate": 1}, "frobnicate"),
    ({"messages": Q, "self": 1}, "self"),
    ({"messages": Q, "n": 3}, "n"),
    ({"messages": Q, "max_tokens": 65}, "max_tokens"),
    ({"messages": Q * 9}, "messages"),
])
def test_bad_requests_are_400_with_param(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param or (error["param"] or "").startswith(param), error


def test_context_overflow_is_400(http: httpx.Client) -> None:
    long = [{"role": "user", "content": "x" * 2100}]
    error = error_of(http.post("/v1/chat/completions", json={"messages": long}), 400)
    assert error["code"] == "context_length_exceeded"


def test_malformed_bodies(http: httpx.Client) -> None:
    assert error_of(http.post("/v1/chat/completions", content=b"{nope"), 400)["code"] == "invalid_json"
    assert error_of(http.post("/v1/chat/completions", content=b"[1, 2]"), 400)["code"] == "invalid_json"
    assert error_of(http.post("/v1/chat/completions", content=b"\xff\xfe"), 400)["code"] == "invalid_json"
    deep = b"[" * 100_00 + b"]" * 100_00
    assert error_of(http.post("/v1/chat/completions", content=deep), 400)["code"] == "invalid_json"


def test_body_too_large_is_413(http: httpx.Client) -> None:
    big = {"messages": [{"role": "user", "content": "x" * 30_000}]}
    assert error_of(http.post("/v1/chat/completions", json=big), 413)["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}]}'

    error_of(http.post("/v1/chat/completions", content=chunks()), 413)


# -- safety -----------------------------------------------------------------------------------
def test_bind_rule() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "key")
    check_bind("0.0.0.0", None, allow_insecure_no_key=True)
    with pytest.raises(InvalidRequestError, match="without an API key") as caught:
        check_bind("0.0.0.0", None)
    assert caught.value.param == "host"


def test_cli_refuses_public_bind_without_key(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from local_llm_kit.cli import main

    monkeypatch.delenv("LOCAL_LLM_KIT_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--model", "no-such-model"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    import local_llm_kit
    from local_llm_kit.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"local-llm-kit {local_llm_kit.__version__}"


@pytest.mark.parametrize("port", ["99999", "-5", "http"])
def test_cli_refuses_a_bad_port_before_loading_anything(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    from local_llm_kit.cli import main

    with pytest.raises(SystemExit) as exited:  # argparse's usage error, before the model (no such one) loads
        main(["serve", "--port", port, "--model", "no-such-model"])
    assert exited.value.code == 2
    assert "a port is a number from 0 to 65535" in capsys.readouterr().err


def test_cli_models_lists_the_environments_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from local_llm_kit.cli import main

    (tmp_path / "mine.gguf").write_bytes(b"GGUF....")
    monkeypatch.setenv("LOCAL_LLM_KIT_MODEL_PATH", str(tmp_path))
    assert main(["models", "--json"]) == 0
    assert "mine" in [row["name"] for row in json.loads(capsys.readouterr().out)]


def named_fake(name: str, reply: str) -> AsyncLLMClient:
    """A fake client whose model answers to ``name``."""
    engine = Engine(ResolvedModel(name, Path("fake"), "fake"), "fake", FakeBackend(reply))
    client = AsyncLLMClient(name, temperature=0)
    client._resolved = engine.model
    client._engine = engine
    return client


def test_two_models_are_served_by_name() -> None:
    with running_server([named_fake("first-model", "one"), named_fake("other-model", "two")]) as running:
        ask: dict[str, Any] = {"messages": Q}
        assert httpx.post(running.base_url + "/chat/completions", json={**ask, "model": "other-model"}
                          ).json()["choices"][0]["message"]["content"] == "two"
        assert httpx.post(running.base_url + "/chat/completions", json=ask
                          ).json()["choices"][0]["message"]["content"] == "one"
        assert [m["id"] for m in httpx.get(running.base_url + "/models").json()["data"]] == [
            "first-model", "other-model"]


# -- queue and disconnects ----------------------------------------------------------------------
def wait_idle(server: RunningServer, timeout: float = 30) -> dict[str, Any]:
    """The server's /health once nothing generates or waits (polled; fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        health: dict[str, Any] = httpx.get(server.url + "/health").json()
        if (health["generating"] == 0 and health["waiting"] == 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_burst_past_the_queue_gets_503_and_serving_goes_on() -> None:
    backend = SlowBackend("slow reply", delay=0.01)
    with running_server(fake(backend=backend), limits=ServerLimits(max_queue=2)) as running:
        statuses: list[int] = []
        lock = threading.Lock()

        def ask() -> None:
            response = httpx.post(running.base_url + "/chat/completions", json={"messages": Q}, timeout=60)
            with lock:
                statuses.append(response.status_code)
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "server_overloaded"
                assert response.headers["retry-after"] == "1"

        threads = [threading.Thread(target=ask) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses.count(200) >= 3 and statuses.count(503) >= 1, statuses
        assert set(statuses) == {200, 503}
        assert wait_idle(running) == {"status": "ok", "generating": 0, "waiting": 0}
        after = httpx.post(running.base_url + "/chat/completions", json={"messages": Q}, timeout=60)
        assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "slow reply"


def test_a_client_that_gives_up_in_the_queue_frees_its_place() -> None:
    """With max_queue=1 a queued client that times out used to keep its place until the model was
    free: /health said waiting 1 and the next live request got 503."""
    backend = SlowBackend("z" * 300, delay=0.01)
    with running_server(fake(backend=backend), limits=ServerLimits(max_queue=1)) as running:
        long = threading.Thread(target=lambda: httpx.post(running.base_url + "/chat/completions",
                                                          json={"messages": Q}, timeout=60))
        long.start()
        deadline = time.monotonic() + 10
        while httpx.get(running.url + "/health").json()["generating"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the long one, then gives up
            httpx.post(running.base_url + "/chat/completions", json={"messages": Q}, timeout=0.3)
        deadline = time.monotonic() + 5
        while (health := httpx.get(running.url + "/health").json())["waiting"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health == {"status": "ok", "generating": 1, "waiting": 0}
        queued = httpx.post(running.base_url + "/chat/completions", json={"messages": Q, "max_tokens": 3},
                            timeout=60)
        assert queued.status_code == 200 and queued.json()["choices"][0]["message"]["content"] == "zzz"
        long.join()
        assert wait_idle(running) == {"status": "ok", "generating": 0, "waiting": 0}


def test_dropped_streams_stop_generating() -> None:
    backend = SlowBackend("x" * 400, delay=0.01)
    client = fake(backend=backend)
    with running_server(client) as running:
        for _ in range(5):
            with httpx.stream("POST", running.base_url + "/chat/completions",
                              json={"messages": Q, "stream": True}, timeout=60) as response:
                lines = response.iter_lines()
                for _ in range(3):
                    next(lines)
            # leaving the block closes the connection mid-stream
        assert wait_idle(running) == {"status": "ok", "generating": 0, "waiting": 0}
        settled = backend.forwards
        time.sleep(0.3)
        assert backend.forwards == settled, "a dropped stream kept generating"
        assert settled < 5 * 100, "streams ran far past the point where they were dropped"
        assert not client.engine.lease.busy, "something still holds the model"
        done = httpx.post(running.base_url + "/chat/completions", json={"messages": Q, "max_tokens": 5}, timeout=60)
        assert done.status_code == 200 and done.json()["choices"][0]["message"]["content"] == "xxxxx"


def test_dropped_non_streaming_request_stops_generating() -> None:
    backend = SlowBackend("y" * 1000, delay=0.01)
    with running_server(fake(backend=backend)) as running:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(running.base_url + "/chat/completions", json={"messages": Q}, timeout=0.5)
        assert wait_idle(running)["generating"] == 0
        settled = backend.forwards
        time.sleep(0.3)
        assert backend.forwards <= settled + 1 and settled < 500


def test_a_request_past_its_own_timeout_is_504_and_not_retried() -> None:
    backend = SlowBackend("z" * 1000, delay=0.01)
    with running_server(fake(backend=backend)) as running:
        response = httpx.post(running.base_url + "/chat/completions", json={"messages": Q, "timeout": 0.2}, timeout=60)
        error = error_of(response, 504)
        assert (error["type"], error["code"], error["param"]) == ("timeout_error", "timeout", "timeout")
        assert response.headers["x-should-retry"] == "false"  # openai's client would otherwise pay it thrice
        assert backend.forwards < 500  # stopped, not run to its end


def test_a_lone_surrogate_is_a_400_naming_the_field(http: httpx.Client) -> None:
    # An emoji cut in half by a client counting UTF-16 units: valid JSON, not encodable text.
    body = b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}'
    for path in ("/v1/chat/completions", "/tokenize"):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert error_of(response, 400)["param"] == "messages[0].content"
    assert http.post("/v1/chat/completions", json={"messages": Q}).status_code == 200  # still serving


def test_tokenize_counts_what_shapes_the_prompt(http: httpx.Client) -> None:
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"]}}}
    counting = fake_client(temperature=0)
    for shaping in ({"tool_choice": "required"}, {"tool_choice": "none"}, {"parallel_tool_calls": False}):
        counted = http.post("/tokenize", json={"messages": Q, "tools": [tool], **shaping})
        assert counted.status_code == 200, counted.text
        assert counted.json()["count"] == counting.count_tokens(Q, [tool], **shaping)  # type: ignore[arg-type]
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}
    counted = http.post("/tokenize", json={"messages": Q, "response_format": schema}).json()["count"]
    assert counted == counting.count_tokens(Q, response_format=schema)  # type: ignore[arg-type]
    assert counted > http.post("/tokenize", json={"messages": Q}).json()["count"]  # the schema's instruction
