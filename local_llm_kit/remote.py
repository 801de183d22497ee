"""``backend="openai"``: the same ``create()``, forwarded to an OpenAI-compatible server.

vLLM, SGLang, llama.cpp's server, Ollama and ``local-llm-kit serve`` all speak OpenAI's chat
completions protocol. A client with ``backend="openai"`` validates each request exactly as the
in-process client does (so a bad parameter raises the same :class:`InvalidRequestError`
before anything is sent), forwards the whole request, and returns our response types. Such an
engine owns tokenization, templates and decoding, so this sits above the token-level backend
contract: it replaces the request path, not a backend.

**Transport.** httpx, used directly (it is what openai-python is built on): the request is
ours, already validated, and we need control of retries, of when a stream counts as started,
and of closing a stream's connection so the server stops generating.

**Retries, only where safe.** A connection that could not be made (nothing was sent) and a
429/503 answer (the server refused before doing any work) are retried ``max_retries`` times
with backoff (honouring ``Retry-After``). Nothing is retried once a request may have been
processed: not a read timeout, not a dropped connection, never a stream that has started.

**Errors.** 400 and 413 raise :class:`InvalidRequestError` (``param`` as the server named it),
404 for the model :class:`ModelNotFoundError`; an unreachable server, a timeout, 401/403, 429
and 5xx raise :class:`RemoteServerError` saying which.

**Token counts** (``count_tokens``, memory budgets) are exact: the server's ``POST /tokenize``
(vLLM's endpoint, also served by ``local-llm-kit serve``) is used when it exists; otherwise the
count is the ``usage.prompt_tokens`` of a one-token completion of the same request, which is
what ``create()`` would report by definition (it costs the server one prefill).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

try:
    import httpx
except ImportError as _missing:  # the client raises a clear error when backend="openai" is used
    raise ImportError("backend='openai' needs httpx: pip install 'local-llm-kit[server]'") from _missing

from local_llm_kit.client import AsyncCompletions, Completions
from local_llm_kit.errors import (
    InvalidRequestError,
    LocalLLMKitError,
    ModelNotFoundError,
    TokenLimitError,
)
from local_llm_kit.request import ChatRequest, normalize_messages
from local_llm_kit.streaming import AsyncStream, ReplyCollector, Stream
from local_llm_kit.types import CompletionChunk, CompletionResponse, Message

__all__ = ["AsyncRemoteCompletions", "RemoteCompletions", "RemoteEndpoint", "RemoteServerError", "count_tokens",
           "create_parameter_names", "request_body"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_RETRIES = 2
_RETRY_STATUSES = (429, 503)
_PROMPT_SHAPING = frozenset({"tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format"})
_MAX_BACKOFF_S = 8.0


class RemoteServerError(LocalLLMKitError):
    """``backend="openai"``: the server could not be reached, timed out, refused the key, or failed.

    ``status`` is the HTTP status it answered with (None when there was no answer).
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _Rejected(InvalidRequestError):
    """The server answered 400: an :class:`InvalidRequestError` that also keeps the server's code."""

    def __init__(self, message: str, *, param: str | None, code: str | None) -> None:
        super().__init__(message, param=param)
        self.code = code


class _ContextOverflow(TokenLimitError):
    """The server said the prompt (plus ``max_tokens``) does not fit its context.

    The numbers are read from the server's message where it gives them (ours, vLLM's and
    llama.cpp's do); a number the message does not give is 0.
    """

    def __init__(self, message: str, *, param: str | None) -> None:
        numbers = _overflow_numbers(message)
        super().__init__(message, prompt_tokens=numbers[0], max_tokens=numbers[1], context_length=numbers[2],
                         param=param or "messages")


_OVERFLOW_PATTERNS = (
    # local-llm-kit: "the prompt is P tokens plus max_tokens=M, which exceeds the context length of C tokens"
    (re.compile(r"prompt is (\d+) tokens(?: plus max_tokens=(\d+))?.*context length of (\d+)"), (1, 2, 3)),
    # vLLM: "maximum context length is C tokens. However, you requested T tokens (P in the messages, M in ...)"
    (re.compile(r"maximum context length is (\d+) tokens.*?\((\d+) in the messages, (\d+) in the completion"),
     (2, 3, 1)),
    # llama.cpp's server: "Requested tokens (P) exceed context window of C"
    (re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)"), (1, None, 2)),
)


def _overflow_numbers(message: str) -> tuple[int, int | None, int]:
    for pattern, (prompt, asked, context) in _OVERFLOW_PATTERNS:
        match = pattern.search(message)
        if match:
            max_tokens = match.group(asked) if asked is not None else None
            return int(match.group(prompt)), int(max_tokens) if max_tokens else None, int(match.group(context))
    return 0, None, 0


def _is_overflow(code: str | None, message: str) -> bool:
    text = message.lower()
    return code == "context_length_exceeded" or "context length" in text or "context window" in text


def request_body(request: ChatRequest, model: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body for a validated request: what was asked, in OpenAI's field names.

    Sampling defaults of the client (``temperature``, ``top_p``) are sent explicitly, so a
    remote server samples as the in-process client would.
    """
    body: dict[str, Any] = {"model": model, "messages": list(request.messages),
                            "temperature": request.temperature, "top_p": request.top_p}
    if request.stream:
        body["stream"] = True
        if request.include_usage:
            body["stream_options"] = {"include_usage": True}
    optional: dict[str, Any] = {
        "max_tokens": request.max_tokens, "seed": request.seed, "user": request.user,
        "stop": list(request.stop) or None, "n": request.n if request.n != 1 else None,
        "presence_penalty": request.presence_penalty or None, "frequency_penalty": request.frequency_penalty or None,
        "logit_bias": {str(k): v for k, v in request.logit_bias.items()} or None,
        "logprobs": True if request.logprobs else None,
        "top_logprobs": request.top_logprobs if request.logprobs and request.top_logprobs else None,
        "response_format": request.response_format,
        "tools": list(request.tools) if request.tools else None, "tool_choice": request.tool_choice,
        "parallel_tool_calls": request.parallel_tool_calls,
        "functions": list(request.functions) if request.functions else None,
        "function_call": request.function_call,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    for name, value in (extra or {}).items():
        if name in body:
            raise InvalidRequestError(f"extra_body.{name} would replace a validated parameter",
                                      param=f"extra_body.{name}")
        body[name] = value
    return body


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
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http: httpx.Client = httpx.Client(timeout=self.timeout, headers=self._headers)
        self._async: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None
        self._explicit_model = model
        self._model: str | None = model
        self._model_lock = threading.Lock()
        self._tokenize_supported: bool | None = None
        self.closed = False

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
        """Exactly the ``usage.prompt_tokens`` that sending ``body`` would report (see module doc)."""
        # Parameters that change the prompt beyond messages and tools: only a completion counts them.
        prompt_shaping = _PROMPT_SHAPING & set(body)
        if self._tokenize_supported is not False and not prompt_shaping:
            tokenize = {"model": body["model"], "messages": body["messages"], "add_generation_prompt": True}
            if body.get("tools"):
                tokenize["tools"] = body["tools"]
            try:
                answer = self.request("POST", self.root_url + "/tokenize", tokenize)
            except RemoteServerError as exc:
                if exc.status not in (404, 405):
                    raise
                logger.info("%s has no /tokenize endpoint: counting with one-token completions", self.root_url)
                self._tokenize_supported = False
            except _Rejected:
                pass  # this server's /tokenize does not take this request (e.g. tools): count with a completion
            else:
                if isinstance(answer.get("count"), int):
                    self._tokenize_supported = True
                    return int(answer["count"])
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
        """Send one request and return its JSON answer; errors mapped (see the module doc)."""
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, url, json=body, timeout=timeout or self.timeout,
                                              headers=dict(headers or {}), params=params)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt < self.max_retries:
                    self._backoff(attempt, None)
                    continue
                raise _unreachable(url, exc) from exc
            except httpx.TimeoutException as exc:
                raise RemoteServerError(f"{url} did not answer within {timeout or self.timeout} s") from exc
            except httpx.HTTPError as exc:
                raise RemoteServerError(f"the request to {url} failed: {exc!r}") from exc
            if response.status_code in _RETRY_STATUSES and attempt < self.max_retries:
                self._backoff(attempt, response.headers.get("retry-after"))
                continue
            return _json_or_raise(response.status_code, response.content, url, self._model_hint(body))
        raise AssertionError("unreachable")

    def open_stream(self, body: dict[str, Any], *, timeout: float | None = None,
                    headers: Mapping[str, str] | None = None,
                    params: Mapping[str, Any] | None = None) -> httpx.Response:
        """Send a streaming request and return the response once the server has accepted it.

        Errors the server answers with (a bad parameter, an unknown model) raise here, as
        openai-python raises them from ``create()``; the events are read by :func:`iter_chunks`.
        """
        url = self.base_url + "/chat/completions"
        for attempt in range(self.max_retries + 1):
            request = self._http.build_request("POST", url, json=body, timeout=timeout or self.timeout,
                                               headers=dict(headers or {}), params=params)
            try:
                response = self._http.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt < self.max_retries:
                    self._backoff(attempt, None)
                    continue
                raise _unreachable(url, exc) from exc
            except httpx.TimeoutException as exc:
                raise RemoteServerError(f"{url} did not answer within {timeout or self.timeout} s") from exc
            except httpx.HTTPError as exc:
                raise RemoteServerError(f"the request to {url} failed: {exc!r}") from exc
            if response.status_code == 200:
                return response
            content = response.read()
            response.close()
            if response.status_code in _RETRY_STATUSES and attempt < self.max_retries:
                self._backoff(attempt, response.headers.get("retry-after"))
                continue
            _json_or_raise(response.status_code, content, url, self._model_hint(body))
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
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt < self.max_retries:
                    await asyncio.sleep(_delay(attempt, None))
                    continue
                raise _unreachable(url, exc) from exc
            except httpx.TimeoutException as exc:
                raise RemoteServerError(f"{url} did not answer within {timeout or self.timeout} s") from exc
            except httpx.HTTPError as exc:
                raise RemoteServerError(f"the request to {url} failed: {exc!r}") from exc
            if response.status_code in _RETRY_STATUSES and attempt < self.max_retries:
                await asyncio.sleep(_delay(attempt, response.headers.get("retry-after")))
                continue
            return _json_or_raise(response.status_code, response.content, url, self._model_hint(body))
        raise AssertionError("unreachable")

    def _async_client(self) -> httpx.AsyncClient:
        # An httpx.AsyncClient's connections belong to one event loop: one client per loop.
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            self._async = (loop, httpx.AsyncClient(timeout=self.timeout, headers=self._headers))
        return self._async[1]

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


def _unreachable(url: str, exc: Exception) -> RemoteServerError:
    return RemoteServerError(f"cannot connect to {url}: {exc} (is the server running, and is base_url right?)")


def _json_or_raise(status: int, content: bytes, url: str, model: str | None) -> dict[str, Any]:
    """The JSON answer of a 200, or the error an unsuccessful answer means."""
    try:
        data = json.loads(content) if content else {}
    except ValueError:
        data = {"error": {"message": content[:500].decode(errors="replace")}}
    if status == 200 and isinstance(data, dict):
        return data
    raise error_from_answer(status, data, url, model)


def error_from_answer(status: int, data: Any, url: str, model: str | None) -> LocalLLMKitError:
    """The library error for a server's error answer (OpenAI's, vLLM's or FastAPI's body shapes)."""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):  # vLLM's older {"object": "error", "message": ...}, FastAPI's {"detail": ...}
        error = data if isinstance(data, dict) else {"message": str(data)}
    message = error.get("message") or error.get("detail") or json.dumps(data)[:500]
    if not isinstance(message, str):
        message = json.dumps(message)[:500]
    param = error.get("param") if isinstance(error.get("param"), str) else None
    code = error.get("code") if isinstance(error.get("code"), str) else None
    text = f"{url} answered {status}: {message}"
    if status in (400, 422):
        if _is_overflow(code, message):
            return _ContextOverflow(text, param=param)
        return _Rejected(text, param=param, code=code)
    if status == 413:
        return _Rejected(text, param=param or "messages", code=code)
    if status == 404 and (code == "model_not_found" or param == "model" or (model and model in message)):
        return ModelNotFoundError(f"the server does not serve the model {model!r}: {text}")
    if status in (401, 403):
        return RemoteServerError(f"the server refused the API key ({status}); pass api_key= or set "
                                 f"LOCAL_LLM_KIT_API_KEY: {text}", status=status, code=code)
    if status == 404:
        return RemoteServerError(f"{text} (base_url should end in /v1)", status=status, code=code)
    return RemoteServerError(text, status=status, code=code)


def iter_chunks(response: httpx.Response, cancel: threading.Event | None = None) -> Iterator[CompletionChunk]:
    """The chunks of a streaming answer, until ``data: [DONE]``; closes the response at the end.

    Closing the iterator (or setting ``cancel``) closes the connection: a server that watches its
    connections (vLLM, ours) stops generating.
    """
    try:
        for payload in _events(response.iter_lines()):
            if payload == "[DONE]":
                return
            yield _chunk(payload, str(response.url))
            if cancel is not None and cancel.is_set():
                return
        raise RemoteServerError(f"{response.url}: the stream ended without 'data: [DONE]' (connection lost?)")
    except httpx.HTTPError as exc:
        raise RemoteServerError(f"{response.url}: the stream broke off: {exc!r}") from exc
    finally:
        response.close()


def _events(lines: Iterator[str]) -> Iterator[str]:
    """The data payloads of a server-sent event stream."""
    data: list[str] = []
    for line in lines:
        yield from _feed(line, data)
    if data:
        yield "\n".join(data)


def _feed(line: str, data: list[str]) -> Iterator[str]:
    line = line.rstrip("\r")
    if not line:
        if data:
            yield "\n".join(data)
            data.clear()
    elif line.startswith("data:"):
        value = line[5:]
        data.append(value[1:] if value.startswith(" ") else value)
        # Servers put one JSON document per data line; dispatch at once rather than waiting
        # for the blank line, so a chunk is not held back by the server's buffering.
        if data[-1] == "[DONE]" or _complete_json(data[-1]):
            yield "\n".join(data)
            data.clear()
    # comments (":"), "event:", "id:" and "retry:" lines carry nothing for chat completions


def _complete_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _chunk(payload: str, url: str) -> CompletionChunk:
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise RemoteServerError(f"{url} sent an event that is not JSON: {payload[:200]!r}") from exc
    if isinstance(data, dict) and "error" in data:
        error = data["error"]
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) else 500
        raise error_from_answer(status, data, url, None)
    try:
        return CompletionChunk.model_validate(data)
    except ValidationError as exc:
        raise RemoteServerError(f"{url} sent a chunk that is not a chat completion chunk: {exc}") from exc


def parse_completion(data: dict[str, Any], url: str) -> CompletionResponse:
    try:
        return CompletionResponse.model_validate(data)
    except ValidationError as exc:
        raise RemoteServerError(f"{url} answered with something that is not a chat completion: {exc}") from exc


def close_on_collect(owner: object, response: httpx.Response) -> None:
    """Close ``response`` when ``owner`` (a stream never iterated to its end) is collected."""
    weakref.finalize(owner, response.close)


def split_options(params: Mapping[str, Any], known: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate the HTTP options (``timeout``, ``extra_*``) from the request's parameters.

    ``extra_body`` keys that are parameters of ``create()`` join the others (and are validated);
    the rest go to the server as given, since only the server knows them (vLLM's ``top_k``...).
    """
    args = dict(params)
    options: dict[str, Any] = {name: args.pop(name) for name in ("timeout", "extra_body", "extra_headers",
                                                                "extra_query") if name in args}
    extra = options.pop("extra_body", None)
    forwarded: dict[str, Any] = {}
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise InvalidRequestError("extra_body must be a dict", param="extra_body")
        for name, value in extra.items():
            if name in known:
                if args.get(name) is not None:
                    raise InvalidRequestError(f"{name} is given both by name and in extra_body",
                                              param=f"extra_body.{name}")
                args[name] = value
            else:
                forwarded[str(name)] = value
    for name in ("extra_headers", "extra_query"):
        value = options.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise InvalidRequestError(f"{name} must be a dict", param=name)
    timeout = options.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise InvalidRequestError(f"timeout must be a positive number of seconds, got {timeout!r}", param="timeout")
    options["extra_body"] = forwarded
    return args, options


# -- create() over HTTP ------------------------------------------------------------------------
def create_parameter_names() -> frozenset[str]:
    """The parameters ``create()`` takes (as the in-process client declares them)."""
    from local_llm_kit.params import CompletionCreateParams

    return frozenset(CompletionCreateParams.__required_keys__ | CompletionCreateParams.__optional_keys__) | {"stream"}


# logit_bias keys are checked against the vocabulary by the server, which knows it.
_ANY_VOCAB = 2**31
# OpenAI parameters a local model cannot honour: a remote server may, so they are forwarded.
_SERVER_ONLY = frozenset({"audio", "modalities", "prediction", "reasoning_effort", "service_tier",
                          "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier",
                          "store", "metadata"})


class RemoteCall:
    """One ``create()`` call: the validated request, its body and its HTTP options."""

    def __init__(self, request: ChatRequest, body: dict[str, Any], options: dict[str, Any],
                 new_messages: list[dict[str, Any]]) -> None:
        self.request = request
        self.body = body
        self.timeout: float | None = options.get("timeout")
        self.headers: Mapping[str, str] | None = options.get("extra_headers")
        self.params: Mapping[str, Any] | None = options.get("extra_query")
        self.new_messages = new_messages


def prepare_call(endpoint: RemoteEndpoint, settings: Any, stream: Any, params: Mapping[str, Any]) -> RemoteCall:
    """Validate ``create()``'s arguments as the in-process client does; build the body."""
    from local_llm_kit.request import validate_request

    known = create_parameter_names()
    args, options = split_options(params, sorted(known))
    forwarded = dict(options["extra_body"])
    for name in sorted(set(args) - known):
        value = args.pop(name)
        if name not in _SERVER_ONLY:
            raise InvalidRequestError(f"unknown parameter {name!r}", param=name)
        if value is not None:
            forwarded[name] = value  # the server decides whether it honours it
    if args.get("messages") is None:
        raise InvalidRequestError("messages is required", param="messages")
    args["stream"] = stream
    request = validate_request(args, default_temperature=settings.temperature, default_top_p=settings.top_p,
                               n_vocab=_ANY_VOCAB)
    body = request_body(request, request.model or endpoint.model, forwarded)
    return RemoteCall(request, body, options, list(request.messages))


class _RemoteMixin:
    """What the sync and async remote ``completions`` share: memory around a forwarded request."""

    _client: Any
    _endpoint: RemoteEndpoint

    def _bodies(self, call: RemoteCall) -> Iterator[dict[str, Any]]:
        """The body to send, then (with memory) ones with fewer remembered turns, oldest dropped first.

        The server's context length is the server's business: a body is only replaced by a
        shorter one when the server answers that it does not fit.
        """
        memory = self._client._memory
        if memory is None:
            yield call.body
            return
        new = list(call.request.messages)
        replaces_system = any(m["role"] == "system" for m in new)
        if replaces_system:
            new = [m for m in new if m["role"] == "system"] + [m for m in new if m["role"] != "system"]
        for dropped, history in enumerate(memory.candidates()):
            if replaces_system:
                history = [m for m in history if m["role"] != "system"]
            if dropped:
                logger.info("memory: leaving out the %d oldest turns to fit the server's context", dropped)
            yield {**call.body, "messages": history + new}

    def _remember(self, new_messages: Sequence[dict[str, Any]], reply: Message) -> None:
        memory = self._client._memory
        if memory is not None:
            # Only what a later request may send back: a server's extra fields stay out.
            kept = Message(content=reply.content, tool_calls=reply.tool_calls, function_call=reply.function_call)
            memory.add([*new_messages, *normalize_messages([kept.model_dump(exclude_none=True)])])


def _overflowed(exc: Exception, more: bool) -> bool:
    return more and isinstance(exc, _ContextOverflow)


class RemoteCompletions(_RemoteMixin, Completions):
    """``client.chat.completions`` of an ``LLMClient(backend="openai")``."""

    def __init__(self, client: Any, endpoint: RemoteEndpoint) -> None:
        super().__init__(client)
        self._endpoint = endpoint

    def create(self, *, stream: bool = False, **params: Any) -> Any:
        """Validate as the in-process client does, forward, and return our response types."""
        call = prepare_call(self._endpoint, self._client.settings, stream, params)
        bodies = list(self._bodies(call))
        for i, body in enumerate(bodies):
            try:
                if call.request.stream:
                    response = self._endpoint.open_stream(body, timeout=call.timeout, headers=call.headers,
                                                          params=call.params)
                else:
                    data = self._endpoint.request("POST", self._endpoint.base_url + "/chat/completions", body,
                                                  timeout=call.timeout, headers=call.headers, params=call.params)
            except InvalidRequestError as exc:
                if _overflowed(exc, i + 1 < len(bodies)):
                    continue
                raise
            if call.request.stream:
                return self._stream(response, call)
            completion = parse_completion(data, self._endpoint.base_url)
            self._remember(call.new_messages, completion.choices[0].message)
            return completion
        raise AssertionError("unreachable")

    def _stream(self, response: httpx.Response, call: RemoteCall) -> Stream[CompletionChunk]:
        collector = ReplyCollector()
        cancel = threading.Event()
        stream = Stream(collector.watch(iter_chunks(response, cancel)), cancel=cancel,
                        on_complete=lambda: self._remember(call.new_messages, collector.message()))
        close_on_collect(stream, response)
        return stream


class AsyncRemoteCompletions(_RemoteMixin, AsyncCompletions):
    """``client.chat.completions`` of an ``AsyncLLMClient(backend="openai")``."""

    def __init__(self, client: Any, endpoint: RemoteEndpoint) -> None:
        super().__init__(client)
        self._endpoint = endpoint

    async def create(self, *, stream: bool = False, **params: Any) -> Any:
        # Naming the model may ask the server (GET /models) once: off the event loop.
        call = await asyncio.to_thread(prepare_call, self._endpoint, self._client.settings, stream, params)
        bodies = list(self._bodies(call))
        for i, body in enumerate(bodies):
            try:
                if call.request.stream:
                    response = await _open_off_loop(self._endpoint, body, call)
                else:
                    data = await self._endpoint.arequest(body, timeout=call.timeout, headers=call.headers,
                                                         params=call.params)
            except InvalidRequestError as exc:
                if _overflowed(exc, i + 1 < len(bodies)):
                    continue
                raise
            if call.request.stream:
                return self._stream(response, call)
            completion = parse_completion(data, self._endpoint.base_url)
            self._remember(call.new_messages, completion.choices[0].message)
            return completion
        raise AssertionError("unreachable")


    def _stream(self, response: httpx.Response, call: RemoteCall) -> AsyncStream[CompletionChunk]:
        collector = ReplyCollector()
        chunks: AsyncStream[CompletionChunk] = AsyncStream(
            lambda cancel: collector.watch(iter_chunks(response, cancel)),
            on_complete=lambda: self._remember(call.new_messages, collector.message()))
        close_on_collect(chunks, response)
        return chunks


async def _open_off_loop(endpoint: RemoteEndpoint, body: dict[str, Any], call: RemoteCall) -> httpx.Response:
    """Open a stream in a thread; if the caller is cancelled meanwhile, close it once it opens."""
    opening = asyncio.ensure_future(asyncio.to_thread(endpoint.open_stream, body, timeout=call.timeout,
                                                      headers=call.headers, params=call.params))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        def close(done: asyncio.Future[httpx.Response]) -> None:
            if not done.cancelled() and done.exception() is None:
                done.result().close()

        opening.add_done_callback(close)
        raise


def count_tokens(client: Any, endpoint: RemoteEndpoint, messages: Any, tools: Any, params: Mapping[str, Any]) -> int:
    """``client.count_tokens`` over the server: exactly the ``prompt_tokens`` of the same request."""
    call = prepare_call(endpoint, client.settings, False, {**params, "messages": messages, "tools": tools})
    return endpoint.count_tokens(call.body)
