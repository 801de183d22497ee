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
404 for the model :class:`ModelNotFoundError`; a timeout raises :class:`GenerationTimeoutError`
(a :class:`TimeoutError`), as in-process: ``timeout=`` is the HTTP timeout (per read: a stream
that keeps sending is not cut), ``extra_body={"timeout": ...}`` goes to the server, whose
deadline covers the whole request (``local-llm-kit serve`` answers 504, ``code: "timeout"``); an
unreachable server, 401/403, 429 and 5xx raise :class:`RemoteServerError` saying which.
``store`` and ``metadata`` go to the server, which decides (``local-llm-kit serve`` refuses
``store=True`` as the in-process client does).

**Token counts** (``count_tokens``, memory budgets) are exact: the server's ``POST /tokenize``
(vLLM's endpoint, also served by ``local-llm-kit serve``) is used when it exists, and for
``tool_choice``, ``response_format`` and the rest of what changes the prompt only when its answer
says it applied them (``prompt_shaping``, as ``local-llm-kit serve`` does); otherwise the count is
the ``usage.prompt_tokens`` of a one-token completion of the same request, which is what
``create()`` would report by definition (it costs the server one prefill).

**Layout** (private modules; the names below are the package's API): ``_transport`` (the
server: connections, retries, token counts), ``_errors`` (answers -> library errors), ``_sse``
(reading streamed and whole answers), ``_request`` (``create()``'s arguments -> the JSON body),
``_completions`` (``chat.completions`` of the sync and async clients, with memory).
"""

from __future__ import annotations

try:
    import httpx  # noqa: F401
except ImportError as _missing:  # the client raises a clear error when backend="openai" is used
    raise ImportError("backend='openai' needs httpx: pip install httpx (or the 'server' extra)") from _missing

from local_llm_kit.errors import RemoteServerError
from local_llm_kit.remote._completions import AsyncRemoteCompletions, RemoteCompletions, count_tokens
from local_llm_kit.remote._request import create_parameter_names, request_body
from local_llm_kit.remote._transport import RemoteEndpoint

__all__ = ["AsyncRemoteCompletions", "RemoteCompletions", "RemoteEndpoint", "RemoteServerError", "count_tokens",
           "create_parameter_names", "request_body"]

# The names show as local_llm_kit.remote.X (in reprs, tracebacks, docs), not as the private module's.
for _name in __all__:
    if _name != "RemoteServerError":  # defined in local_llm_kit.errors, with the others
        globals()[_name].__module__ = __name__
del _name
