"""The HTTP transport: one OpenAI-compatible server, its connections, retries and token counts.

httpx, used directly (it is what openai-python is built on): the request is ours, already
validated, and we need control of retries, of when a stream counts as started, and of closing a
stream's connection so the server stops generating. Retries only where safe: see the package doc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import httpx

from local_llm_kit.errors import GenerationTimeoutError, InvalidRequestError
from local_llm_kit.params import PROMPT_SHAPING_PARAMETERS
from local_llm_kit.remote._errors import Rejected, RemoteServerError, json_or_raise, unreachable

__all__ = ["DEFAULT_MAX_RETRIES", "DEFAULT_TIMEOUT_S", "RemoteEndpoint"]

logger = logging.getLogger("local_llm_kit.remote")

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_RETRIES = 2
_RETRY_STATUSES = (429, 503)
_MAX_BACKOFF_S = 8.0


class RemoteEndpoint:
    """One OpenAI-compatible server: its URL, key, connections, model name and token counter."""

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 timeout: float | None = None, max_retries: int = DEFAULT_MAX_RETRIES) -> None:
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout <= 0):
            raise InvalidRequestError(f"timeout must be a positive number of seconds, got {timeout!r}",
                                      param="timeout")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidRequestError(f"max_retries must be an integer >= 0, got {max_retries!r}",
                                      param="max_retries")
        self.base_url = base_url.rstrip("/")
        # vLLM and our server put /tokenize beside /v1, not under it.
        self.root_url = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self.timeout = float(timeout) if timeout is not None else DEFAULT_TIMEOUT_S
        self.max_retries = max_retries
        self._api_key = api_key
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http: httpx.Client = httpx.Client(timeout=self.timeout, headers=self._headers)
        self._async: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None
        self._model: str | None = model
        self._model_lock = threading.Lock()
        self._tokenize_supported: bool | None = None
        self.closed = False

    def copy(self) -> RemoteEndpoint:
        """The same server, key, model, timeout and retries, over connections of its own."""
        other = RemoteEndpoint(self.base_url, api_key=self._api_key, model=self._model, timeout=self.timeout,
                               max_retries=self.max_retries)
        other._tokenize_supported = self._tokenize_supported
        return other

    # -- model --------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        """The model requests name: the one given, else the only one the server serves."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    served = self.models()
                    if len(served) != 1:
                        raise InvalidRequestError(
                            f"the server at {self.base_url} serves {len(served)} models "
                            f"({', '.join(served) or 'none'}): name one with LLMClient(model=...)", param="model")
                    self._model = served[0]
        return self._model

    def models(self) -> list[str]:
        """The ids of the models the server lists (``GET /v1/models``)."""
        data = self.request("GET", self.base_url + "/models")
        try:
            return [str(entry["id"]) for entry in data["data"]]
        except (KeyError, TypeError) as exc:
            raise RemoteServerError(f"{self.base_url}/models did not answer with a model list: {data!r}") from exc

    def context_length(self) -> int | None:
        """The served model's context window, where the server says it (vLLM, our server)."""
        data = self.request("GET", self.base_url + "/models")
        for entry in data.get("data", []):
            if entry.get("id") == self.model and isinstance(entry.get("max_model_len"), int):
                return int(entry["max_model_len"])
        return None

    # -- token counts ---------------------------------------------------------------------------
    def count_tokens(self, body: dict[str, Any]) -> int:
        """Exactly the ``usage.prompt_tokens`` that sending ``body`` would report (see :mod:`local_llm_kit.remote`)."""
        # Parameters that change the prompt beyond messages and tools: a server's /tokenize counts
        # them only where it says it applied them (this library's server lists them in
        # "prompt_shaping"; another may ignore what it does not know), else a completion counts them.
        prompt_shaping = {name for name in PROMPT_SHAPING_PARAMETERS if body.get(name) is not None}
        if self._tokenize_supported is not False:
            tokenize = {"model": body["model"], "messages": body["messages"], "add_generation_prompt": True}
            if body.get("tools"):
                tokenize["tools"] = body["tools"]
            tokenize.update({name: body[name] for name in prompt_shaping})
            try:
                answer = self.request("POST", self.root_url + "/tokenize", tokenize)
            except RemoteServerError as exc:
                if exc.status not in (404, 405):
                    raise
                logger.info("%s has no /tokenize endpoint: counting with one-token completions", self.root_url)
                self._tokenize_supported = False
            except Rejected:
                pass  # this server's /tokenize does not take this request (e.g. tools): count with a completion
            else:
                if isinstance(answer.get("count"), int):
                    self._tokenize_supported = True
                    if prompt_shaping <= set(answer.get("prompt_shaping") or ()):
                        return int(answer["count"])
                else:
                    self._tokenize_supported = False
        probe = {**body, "max_tokens": 1, "temperature": 0.0, "stream": False}
        probe.pop("stream_options", None)
        probe.pop("n", None)
        usage = self.request("POST", self.base_url + "/chat/completions", probe).get("usage") or {}
        if not isinstance(usage.get("prompt_tokens"), int):
            raise RemoteServerError(f"{self.base_url} reports no usage.prompt_tokens, so tokens cannot be counted")
        return int(usage["prompt_tokens"])

    # -- requests --------------------------------------------------------------------------------
    def request(self, method: str, url: str, body: dict[str, Any] | None = None, *,
                timeout: float | None = None, headers: Mapping[str, str] | None = None,
                params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and return its JSON answer; errors mapped (see :mod:`local_llm_kit.remote`)."""
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, url, json=body, timeout=timeout or self.timeout,
                                              headers=dict(headers or {}), params=params)
            except httpx.HTTPError as exc:
                error = self._failure(exc, url, timeout, attempt)
                if error is None:
                    self._backoff(attempt, None)
                    continue
                raise error from exc
            if response.status_code in _RETRY_STATUSES and attempt < self.max_retries:
                self._backoff(attempt, response.headers.get("retry-after"))
                continue
            return json_or_raise(response.status_code, response.content, url, self._model_hint(body))
        raise AssertionError("unreachable")

    def open_stream(self, body: dict[str, Any], *, timeout: float | None = None,
                    headers: Mapping[str, str] | None = None,
                    params: Mapping[str, Any] | None = None) -> httpx.Response:
        """Send a streaming request and return the response once the server has accepted it.

        Errors the server answers with (a bad parameter, an unknown model) raise here, as
        openai-python raises them from ``create()``; the events are read by ``_sse.iter_chunks``.
        """
        url = self.base_url + "/chat/completions"
        for attempt in range(self.max_retries + 1):
            request = self._http.build_request("POST", url, json=body, timeout=timeout or self.timeout,
                                               headers=dict(headers or {}), params=params)
            try:
                response = self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                error = self._failure(exc, url, timeout, attempt)
                if error is None:
                    self._backoff(attempt, None)
                    continue
                raise error from exc
            if response.status_code == 200:
                return response
            content = response.read()
            response.close()
            if response.status_code in _RETRY_STATUSES and attempt < self.max_retries:
                self._backoff(attempt, response.headers.get("retry-after"))
                continue
            json_or_raise(response.status_code, content, url, self._model_hint(body))
            raise RemoteServerError(f"{url} answered {response.status_code}", status=response.status_code)
        raise AssertionError("unreachable")

    async def arequest(self, body: dict[str, Any], *, timeout: float | None = None,
                       headers: Mapping[str, str] | None = None,
                       params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`request` for ``POST /chat/completions`` on the running event loop (cancellable:
        cancelling closes the connection, and a server that watches it stops generating)."""
        client = self._async_client()
        url = self.base_url + "/chat/completions"
        for attempt in range(self.max_retries + 1):
            try:
                response = await client.post(url, json=body, timeout=timeout or self.timeout,
                                             headers=dict(headers or {}), params=params)
            except httpx.HTTPError as exc:
                error = self._failure(exc, url, timeout, attempt)
                if error is None:
                    await asyncio.sleep(_delay(attempt, None))
                    continue
                raise error from exc
            if response.status_code in _RETRY_STATUSES and attempt < self.max_retries:
                await asyncio.sleep(_delay(attempt, response.headers.get("retry-after")))
                continue
            return json_or_raise(response.status_code, response.content, url, self._model_hint(body))
        raise AssertionError("unreachable")

    def _async_client(self) -> httpx.AsyncClient:
        # An httpx.AsyncClient's connections belong to one event loop: one client per loop.
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            self._async = (loop, httpx.AsyncClient(timeout=self.timeout, headers=self._headers))
        return self._async[1]

    def _failure(self, exc: httpx.HTTPError, url: str, timeout: float | None, attempt: int) -> Exception | None:
        """The error a transport failure raises, or None when it is retried (a connection that
        could not be made: nothing was sent, so another attempt is safe)."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return None if attempt < self.max_retries else unreachable(url, exc)
        if isinstance(exc, httpx.TimeoutException):
            # The same error as an in-process request past its timeout (a TimeoutError too).
            return GenerationTimeoutError(f"{url} did not answer within {timeout or self.timeout} s")
        return RemoteServerError(f"the request to {url} failed: {exc!r}")

    def _backoff(self, attempt: int, retry_after: str | None) -> None:
        time.sleep(_delay(attempt, retry_after))

    def _model_hint(self, body: Mapping[str, Any] | None) -> str | None:
        return str(body["model"]) if body and "model" in body else None

    def close(self) -> None:
        """Close the connections (idempotent)."""
        self.closed = True
        self._http.close()
        if self._async is not None:
            loop, client = self._async
            self._async = None
            if not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    if loop.is_running():
                        asyncio.run_coroutine_threadsafe(client.aclose(), loop)
                    else:
                        loop.run_until_complete(client.aclose())


def _delay(attempt: int, retry_after: str | None) -> float:
    if retry_after is not None:
        with contextlib.suppress(ValueError):
            seconds: float = float(retry_after)
            return min(max(seconds, 0.0), _MAX_BACKOFF_S)
    return min(0.5 * float(1 << attempt), _MAX_BACKOFF_S)


