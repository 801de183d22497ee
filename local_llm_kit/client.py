"""``LLMClient`` and ``AsyncLLMClient``: OpenAI's chat API over a local model, in-process.

>>> client = LLMClient("smollm2-135m-instruct")
>>> reply = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}])
>>> reply.choices[0].message.content
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from typing_extensions import Unpack

from local_llm_kit import chat as chat_path
from local_llm_kit.backends import BackendOptions
from local_llm_kit.config import (
    DEFAULT_MODEL,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    REMOTE_BACKEND,
    Settings,
    resolve_settings,
)
from local_llm_kit.deadline import Deadline, in_thread, timeout_of
from local_llm_kit.engine import Engine, detach, get_engine
from local_llm_kit.errors import (
    BackendNotAvailableError,
    ClientClosedError,
    InvalidRequestError,
    TokenLimitError,
)
from local_llm_kit.memory import ConversationMemory, split_turns
from local_llm_kit.models import ResolvedModel, resolve_model
from local_llm_kit.params import CompletionCreateParams, MessageParam, RequestOptions
from local_llm_kit.parsing import parse_params, parsed_completion
from local_llm_kit.request import ChatRequest, check_tool_results, normalize_messages, validate_request
from local_llm_kit.sharing import Shared, sibling
from local_llm_kit.streaming import AsyncStream, ReplyCollector, Stream
from local_llm_kit.types import CompletionChunk, CompletionResponse, Message, ParsedCompletion

if TYPE_CHECKING:
    from local_llm_kit.remote import RemoteEndpoint

__all__ = ["AsyncLLMClient", "LLMClient"]

logger = logging.getLogger(__name__)

_ParsedT = TypeVar("_ParsedT")

# Parameters of OpenAI's API (and its Python client) that a local model cannot honour.
# Passing one with a value other than None raises instead of being dropped.
UNSUPPORTED_PARAMETERS = frozenset({
    "audio", "modalities", "prediction", "reasoning_effort", "service_tier", "web_search_options",
    "verbosity", "prompt_cache_key", "safety_identifier",
})
# Parameters that only mean something for an HTTP request: empty values are accepted (openai-python
# users pass them through generic code), anything else raises, since nothing here would send them.
HTTP_ONLY_PARAMETERS = frozenset({"extra_headers", "extra_query"})

request_log = logging.getLogger("local_llm_kit.requests")


def _merge_extra_body(params: Mapping[str, Any]) -> dict[str, Any]:
    """``extra_body``'s keys join the named parameters, as openai-python merges them into the body."""
    merged = dict(params)
    extra = merged.pop("extra_body", None)
    if extra is None:
        return merged
    if not isinstance(extra, Mapping):
        raise InvalidRequestError("extra_body must be a dict of parameters", param="extra_body")
    for name, value in extra.items():
        if name in merged and merged[name] is not None:
            raise InvalidRequestError(f"{name} is given both by name and in extra_body", param=f"extra_body.{name}")
        merged[name] = value
    return merged


def _check_passthrough(params: dict[str, Any]) -> None:
    """Reject what cannot be honoured; pop what is honoured outside the request (store, metadata...)."""
    for name in sorted(set(params) - set(_PARAMETER_NAMES)):
        value = params.pop(name)
        if name == "modalities" and isinstance(value, (list, tuple)) and list(value) == ["text"]:
            continue  # text out: what a local model gives (OpenAI's default); "audio" raises below
        if name in UNSUPPORTED_PARAMETERS:
            if value is not None:
                raise InvalidRequestError(f"{name} is not supported by local models", param=name)
        else:
            raise InvalidRequestError(f"unknown parameter {name!r}", param=name)
    for name in HTTP_ONLY_PARAMETERS:
        if params.pop(name, None):
            raise InvalidRequestError(
                f"{name} only applies to HTTP requests, and this client runs the model in-process; "
                "use backend='openai' to send it to a server", param=name)
    if params.pop("store", None) not in (None, False):
        raise InvalidRequestError("store=True is not supported: a local model stores nothing", param="store")
    if params.pop("metadata", None) is not None:
        raise InvalidRequestError("metadata is only kept with store=True, which local models do not support",
                                  param="metadata")


class _BaseClient:
    def __init__(
        self,
        model: str | None = None,
        *,
        model_path: str | os.PathLike[str] | None = None,
        context_length: int | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        backend: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        n_threads: int | None = None,
        dtype: str | None = None,
        device: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        kv_slots: int | None = None,
        n_gpu_layers: int | None = None,
        flash_attn: bool | None = None,
        main_gpu: int | None = None,
        tensor_split: Sequence[float] | None = None,
        prompt_lookup: bool | int | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.settings: Settings = resolve_settings(
            model=model, model_path=model_path, backend=backend, context_length=context_length,
            temperature=temperature, top_p=top_p, cache_dir=cache_dir, n_threads=n_threads,
            dtype=dtype, device=device, base_url=base_url, api_key=api_key, kv_slots=kv_slots,
            n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, main_gpu=main_gpu,
            tensor_split=tensor_split, prompt_lookup=prompt_lookup, cuda_graphs=cuda_graphs,
        )
        self._explicit_model = model
        self._resolved: ResolvedModel | None = None
        self._shared = Shared(self)
        self._closed = False
        # backend="openai": requests go to an OpenAI-compatible server (local_llm_kit.remote).
        self._remote: RemoteEndpoint | None = None
        if self.settings.backend == REMOTE_BACKEND:
            try:
                from local_llm_kit.remote import RemoteEndpoint
            except ImportError as exc:  # httpx, which only the server extra brings
                raise BackendNotAvailableError(f"{exc}; then LLMClient(backend='openai') can reach a server") from exc

            assert self.settings.base_url is not None  # resolve_settings requires it
            self._remote = RemoteEndpoint(self.settings.base_url, api_key=self.settings.api_key, model=model,
                                          timeout=timeout, max_retries=2 if max_retries is None else max_retries)
        elif timeout is not None:
            raise InvalidRequestError("timeout= of the client only applies to backend='openai' (the HTTP "
                                      "request's); in-process, pass timeout= to create()", param="timeout")
        elif max_retries is not None:
            raise InvalidRequestError("max_retries only applies to backend='openai' (retrying a failed HTTP "
                                      "request); an in-process model has no connection to retry", param="max_retries")

    # -- model ----------------------------------------------------------------------------
    @property
    def options(self) -> BackendOptions:
        """The load options the engine gets (context, threads, dtype, device, KV slots, GPU layers...)."""
        s = self.settings
        return BackendOptions(n_ctx=s.context_length, cache_dir=s.cache_dir, n_threads=s.n_threads,
                              dtype=s.dtype, device=s.device, kv_slots=s.kv_slots, n_gpu_layers=s.n_gpu_layers,
                              flash_attn=s.flash_attn, main_gpu=s.main_gpu, tensor_split=s.tensor_split,
                              cuda_graphs=s.cuda_graphs)

    @property
    def model(self) -> str:
        """Name of the model as responses report it."""
        if self._remote is not None:
            return self._remote.model
        return self.resolved_model.name

    @property
    def resolved_model(self) -> ResolvedModel:
        """Where the model name points: its file or folder and format (resolved once, nothing loaded)."""
        if self._resolved is None:
            self._resolved = resolve_model(self._explicit_model, self.settings.model_path,
                                           self.settings.cache_dir, default=DEFAULT_MODEL)
        return self._resolved

    @property
    def engine(self) -> Engine:
        """The loaded model (loaded on first use, shared with clients of the same weights).

        If the model was unloaded meanwhile (``unload_all()``), it is loaded again.
        """
        if self._remote is not None:
            raise InvalidRequestError(f"backend='openai' runs the model on the server at {self._remote.base_url}: "
                                      "there is no local engine", param="backend")
        shared = self._shared
        engine = shared.engine
        if self._closed or engine is None or engine.closed:
            with shared.lock:
                if self._closed:
                    raise ClientClosedError("this client is closed; create a new client to send requests")
                if shared.engine is None or shared.engine.closed:
                    shared.engine = get_engine(self.resolved_model, self.settings.backend, self.options,
                                               attach=True)
                engine = shared.engine
        return engine

    # The engine and the memory live in self._shared (see sharing.py); these keep their old names.
    @property
    def _engine(self) -> Engine | None:
        return self._shared.engine

    @_engine.setter
    def _engine(self, engine: Engine | None) -> None:
        self._shared.engine = engine

    @property
    def _memory(self) -> ConversationMemory | None:
        return self._shared.memory

    @_memory.setter
    def _memory(self, memory: ConversationMemory | None) -> None:
        self._shared.memory = memory

    @property
    def closed(self) -> bool:
        """True after ``close()`` (or the end of a ``with`` block): requests then raise ClientClosedError."""
        return self._closed

    def _close(self) -> None:
        """Let go of the model: the last open client of a model unloads it. Idempotent.

        Clients made by ``as_async()`` / ``as_sync()`` hold the engine together: the last of them
        to close lets go of it.
        """
        shared, engine = self._shared, None
        with shared.lock:
            if not self._closed:
                self._closed = True
                shared.open -= 1
                if not shared.open:
                    engine, shared.engine = shared.engine, None
        if engine is not None:
            detach(engine)
        if self._remote is not None:
            self._remote.close()

    def _open_chat(self) -> None:
        raise NotImplementedError  # LLMClient and AsyncLLMClient make their own ``chat``

    def _engine_for(self, model: str | None) -> Engine:
        if model is not None and not isinstance(model, str):  # checked here: it picks the weights
            raise InvalidRequestError(f"model must be a string, got {model!r}", param="model")
        if model is None or model in (self._explicit_model, self.resolved_model.name):
            return self.engine
        other = resolve_model(model, self.settings.model_path, self.settings.cache_dir, default=DEFAULT_MODEL)
        return get_engine(other, self.settings.backend, self.options)

    def count_tokens(self, messages: Iterable[MessageParam], tools: Sequence[Mapping[str, Any]] | None = None,
                     **params: Unpack[RequestOptions]) -> int:
        """Exactly the ``prompt_tokens`` that ``create()`` with the same arguments reports.

        Takes every argument ``create()`` takes, because several change the prompt (``tools``,
        ``tool_choice``, ``parallel_tool_calls``, ``functions``, ``response_format``): the real
        chat template is rendered with them and tokenized by the model's tokenizer. Memory is not
        added: pass the history to count it.
        """
        if self._remote is not None:
            from local_llm_kit import remote

            return remote.count_tokens(self, self._remote, messages, tools, params)
        _, request, _ = self._validate(False, {**params, "messages": messages, "tools": tools})
        return len(chat_path.encode_request(self._engine_for(request.model), request)[1])

    # -- memory ---------------------------------------------------------------------------
    def enable_memory(self, max_tokens: int = 1000) -> None:
        """Remember the conversation across ``create()`` calls, within ``max_tokens`` model tokens.

        Enabling again changes the budget and keeps what is remembered (trimmed to it).
        """
        if self._memory is None:
            self._memory = ConversationMemory(max_tokens, self._shared.count_history)
        else:
            self._memory.max_tokens = ConversationMemory(max_tokens, self._shared.count_history).max_tokens
            self._memory.replace(self._memory.messages)

    def disable_memory(self) -> None:
        """Stop remembering; what was remembered is dropped."""
        self._memory = None

    @property
    def memory_enabled(self) -> bool:
        """True between ``enable_memory()`` (or ``load_memory()``) and ``disable_memory()``."""
        return self._memory is not None

    @property
    def memory(self) -> list[dict[str, Any]]:
        """A copy of the remembered messages (empty when memory is off)."""
        return self._memory.messages if self._memory is not None else []

    def add_to_memory(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """Remember ``messages`` as if they had been exchanged (validated first; trimmed to the budget)."""
        memory = self._require_memory("add_to_memory")
        memory.add(normalize_messages(messages))

    def clear_memory(self) -> None:
        """Forget every remembered message (memory stays on)."""
        if self._memory is not None:
            self._memory.clear()

    def save_memory(self, path: str | os.PathLike[str]) -> None:
        """Write the remembered messages and the budget to a JSON file."""
        self._require_memory("save_memory").save(path)

    def load_memory(self, path: str | os.PathLike[str]) -> None:
        """Replace the remembered messages with those saved in ``path`` (enabling memory if off)."""
        max_tokens, raw = ConversationMemory.read(path)
        messages = normalize_messages(raw, param="memory")
        if self._memory is None:
            self._memory = ConversationMemory(max_tokens, self._shared.count_history)
        self._memory.replace(messages)

    def _require_memory(self, method: str) -> ConversationMemory:
        if self._memory is None:
            raise InvalidRequestError(f"{method}() needs memory: call enable_memory() first", param="memory")
        return self._memory

    def _count_history(self, messages: Sequence[dict[str, Any]]) -> int:
        if self._remote is not None:
            return self._remote.count_tokens({"model": self.model, "messages": list(messages)})
        return len(chat_path.encode_request(self.engine, ChatRequest.for_counting(messages))[1])

    def _validate(self, stream: Any, params: Mapping[str, Any]) -> tuple[Engine, ChatRequest, float | None]:
        """The request ``create()`` describes, checked the same way for sync and async clients."""
        args = _merge_extra_body(params)
        timeout = timeout_of(args.pop("timeout", None))
        _check_passthrough(args)
        if args.get("messages") is None:
            raise InvalidRequestError("messages is required", param="messages")
        args["stream"] = stream
        engine = self._engine_for(args.get("model"))
        request = validate_request(args, default_temperature=self.settings.temperature,
                                   default_top_p=self.settings.top_p, n_vocab=engine.backend.info.n_vocab)
        request = _with_speculation(request, self.settings.draft_tokens, engine)
        memory = self._memory
        check_tool_results(request.messages, memory.snapshot() if memory is not None else ())
        if request.user is not None:
            request_log.info("request from user %r on %s", request.user, engine.model.name)
        return engine, request, timeout


def _with_speculation(request: ChatRequest, default: int, engine: Engine) -> ChatRequest:
    """The request's draft length, or the client's; refused on an engine that cannot verify drafts."""
    asked = request.draft_tokens
    drafts = default if asked is None else asked
    if drafts and not engine.backend.verifies_drafts:
        raise InvalidRequestError(f"prompt_lookup needs a backend that evaluates several positions per pass; "
                                  f"{engine.backend.name} does not: leave prompt_lookup unset or False",
                                  param="prompt_lookup")
    return request if asked == drafts else replace(request, draft_tokens=drafts)


class _Completions:
    def __init__(self, client: _BaseClient) -> None:
        self._client = client

    def _prepare(self, stream: Any, params: Mapping[str, Any]
                 ) -> tuple[Engine, chat_path.PreparedChat, list[dict[str, Any]], float | None]:
        engine, request, timeout = self._client._validate(stream, params)
        new_messages = list(request.messages)
        memory = self._client._memory
        if memory is None:
            return engine, chat_path.prepare(engine, request, self._client.model), new_messages, timeout
        # The remembered history goes first, trimmed further (oldest turns first) when the
        # whole prompt would not fit the context; a new system message replaces the old one.
        new = list(request.messages)
        remembered = memory.snapshot()
        replaces_system = any(m["role"] == "system" for m in new)
        if replaces_system:
            new = [m for m in new if m["role"] == "system"] + [m for m in new if m["role"] != "system"]

        def split() -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
            """The history's system messages and turns as this request sends them (a walk in
            Python: a warm turn that fits sends the remembered list as it is)."""
            system, turns = split_turns(remembered)
            if replaces_system:
                return [], [[m for m in turn if m["role"] != "system"] for turn in turns]
            return system, turns

        def attempt(history: list[dict[str, Any]]) -> chat_path.PreparedChat | TokenLimitError:
            try:
                return chat_path.prepare(engine, replace(request, messages=tuple(history + new)), self._client.model)
            except TokenLimitError as exc:
                return exc

        # Whole history first (the common case); past the context, the fewest turns to leave
        # out by bisection, as each try renders and tokenizes a prompt that starts anew.
        fits = attempt([m for turn in split()[1] for m in turn] if replaces_system else remembered)
        if isinstance(fits, TokenLimitError):
            system, turns = split()

            def without(drop: int) -> list[dict[str, Any]]:
                return system + [m for turn in turns[drop:] for m in turn]

            shortest = attempt(without(len(turns))) if turns else fits
            if isinstance(shortest, TokenLimitError):
                raise shortest
            low, high, fits = 0, len(turns), shortest  # attempt(low) fails, attempt(high) fits
            while high - low > 1:
                middle = (low + high) // 2
                tried = attempt(without(middle))
                if isinstance(tried, TokenLimitError):
                    low = middle
                else:
                    high, fits = middle, tried
            logger.info("memory: left out the %d oldest turns to fit the context", high)
        return engine, fits, new_messages, timeout

    def _remember(self, new_messages: Sequence[dict[str, Any]], reply: Message) -> None:
        """After a successful call: the new messages and the reply join the memory."""
        memory = self._client._memory
        if memory is not None:
            memory.add([*new_messages, *normalize_messages([reply.model_dump(exclude_none=True)])])


class Completions(_Completions):
    """``client.chat.completions``: ``create()`` as in openai-python."""

    @overload
    def create(self, *, stream: Literal[False] = False,
               **params: Unpack[CompletionCreateParams]) -> CompletionResponse: ...

    @overload
    def create(self, *, stream: Literal[True], **params: Unpack[CompletionCreateParams]) -> Stream[CompletionChunk]: ...

    @overload
    def create(self, *, stream: bool,
               **params: Unpack[CompletionCreateParams]) -> CompletionResponse | Stream[CompletionChunk]: ...

    def create(self, *, stream: bool = False,
               **params: Unpack[CompletionCreateParams]) -> CompletionResponse | Stream[CompletionChunk]:
        """Create a chat completion, exactly as ``openai.OpenAI().chat.completions.create``.

        Returns a :class:`CompletionResponse`, or with ``stream=True`` a :class:`Stream` of
        :class:`CompletionChunk`. The parameters are :class:`CompletionCreateParams`; those a
        local model cannot honour raise :class:`InvalidRequestError` naming them.
        """
        engine, prepared, new_messages, timeout = self._prepare(stream, params)
        cancel = threading.Event()
        deadline = Deadline(timeout, cancel)
        if prepared.request.stream:
            collector = ReplyCollector()
            chunks = deadline.watch(chat_path.stream(engine, prepared, cancel))
            return Stream(collector.watch(chunks), cancel=cancel,
                          on_complete=lambda: self._remember(new_messages, collector.message()))
        response = deadline.complete(chat_path.complete, engine, prepared, cancel)
        self._remember(new_messages, response.choices[0].message)
        return response

    @overload
    def parse(self, *, response_format: type[_ParsedT], **params: Any) -> ParsedCompletion[_ParsedT]: ...

    @overload
    def parse(self, *, response_format: Mapping[str, Any] | None = None, **params: Any) -> ParsedCompletion[Any]: ...

    def parse(self, *, response_format: type[Any] | Mapping[str, Any] | None = None,
              **params: Any) -> ParsedCompletion[Any]:
        """A completion with the reply parsed, as ``openai.OpenAI().chat.completions.parse``.

        ``response_format`` may be a pydantic model class: the reply is decoded under its JSON
        schema and ``choices[i].message.parsed`` is an instance. Strict tools' calls carry
        ``function.parsed_arguments``. A reply cut by ``max_tokens`` raises
        :class:`LengthFinishReasonError` (see :mod:`local_llm_kit.parsing`).
        """
        create_params, model = parse_params({**params, "response_format": response_format})
        response = self.create(**create_params)
        return parsed_completion(response, model, params.get("tools"))


class AsyncCompletions(_Completions):
    """``client.chat.completions`` of :class:`AsyncLLMClient`; generation runs off the event loop."""

    @overload
    async def create(self, *, stream: Literal[False] = False,
                     **params: Unpack[CompletionCreateParams]) -> CompletionResponse: ...

    @overload
    async def create(self, *, stream: Literal[True],
                     **params: Unpack[CompletionCreateParams]) -> AsyncStream[CompletionChunk]: ...

    @overload
    async def create(self, *, stream: bool, **params: Unpack[CompletionCreateParams]
                     ) -> CompletionResponse | AsyncStream[CompletionChunk]: ...

    async def create(self, *, stream: bool = False, **params: Unpack[CompletionCreateParams]
                     ) -> CompletionResponse | AsyncStream[CompletionChunk]:
        """Same parameters and checks as :meth:`Completions.create`; generation runs off the event loop."""
        # Loading and tokenizing may take a while on first use: keep them off the loop too.
        engine, prepared, new_messages, timeout = await asyncio.to_thread(self._prepare, stream, params)
        if prepared.request.stream:
            collector = ReplyCollector()

            def source(cancel: threading.Event) -> Iterator[CompletionChunk]:
                chunks = Deadline(timeout, cancel).watch(chat_path.stream(engine, prepared, cancel))
                return collector.watch(chunks)

            return AsyncStream(source, on_complete=lambda: self._remember(new_messages, collector.message()))
        cancel = threading.Event()
        deadline = Deadline(timeout, cancel)
        worker: asyncio.Future[CompletionResponse] = in_thread(
            deadline.complete, chat_path.complete, engine, prepared, cancel)
        try:
            response = await asyncio.shield(worker)
        except asyncio.CancelledError:
            cancel.set()  # the worker stops before its next token
            # ... and ends with GenerationCancelledError, which nobody awaits any more: retrieve it
            # so asyncio does not log "exception was never retrieved".
            worker.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise
        self._remember(new_messages, response.choices[0].message)
        return response

    @overload
    async def parse(self, *, response_format: type[_ParsedT], **params: Any) -> ParsedCompletion[_ParsedT]: ...

    @overload
    async def parse(self, *, response_format: Mapping[str, Any] | None = None,
                    **params: Any) -> ParsedCompletion[Any]: ...

    async def parse(self, *, response_format: type[Any] | Mapping[str, Any] | None = None,
                    **params: Any) -> ParsedCompletion[Any]:
        """As :meth:`Completions.parse`; generation runs off the event loop."""
        create_params, model = parse_params({**params, "response_format": response_format})
        response = await self.create(**create_params)
        return parsed_completion(response, model, params.get("tools"))


_PARAMETER_NAMES = frozenset(
    {"stream"} | CompletionCreateParams.__required_keys__ | CompletionCreateParams.__optional_keys__)


class Chat:
    """``client.chat``: holds ``completions``, as in openai-python."""

    def __init__(self, completions: Completions) -> None:
        self.completions = completions


class AsyncChat:
    """``client.chat`` of :class:`AsyncLLMClient`."""

    def __init__(self, completions: AsyncCompletions) -> None:
        self.completions = completions


class LLMClient(_BaseClient):
    """A local model behind OpenAI's chat completions API.

    :param model: alias of a packaged model (``smollm2-135m-instruct``, ``gemma-3-270m``), a
        GGUF file or a Hugging Face model folder; default: ``LOCAL_LLM_KIT_MODEL_PATH`` or the
        embedded SmolLM2.
    :param model_path: the weights to load, or a folder to search for ``model``.
    :param context_length: context window in tokens (default 2048).
    :param temperature: default sampling temperature (0.7); 0 is greedy.
    :param top_p: default nucleus sampling mass (0.9).
    :param backend: ``'llama.cpp'`` (default), ``'transformers'``, or ``'openai'``: requests go to the
        OpenAI-compatible server at ``base_url`` (vLLM, llama.cpp's server, ``local-llm-kit serve``...),
        with ``api_key`` (default ``LOCAL_LLM_KIT_API_KEY``), ``timeout`` (s, default 600) and
        ``max_retries`` (default 2; only where safe, see :mod:`local_llm_kit.remote`).
    :param kv_slots: conversations whose KV cache a loaded model keeps at once (default: up to 4,
        as many as fit 1 GiB at this context length; see :mod:`local_llm_kit.slots`).
    :param n_gpu_layers: llama.cpp: layers to offload to the GPU (-1: all); with ``flash_attn``,
        ``main_gpu`` and ``tensor_split``, needs llama-cpp-python built with GPU support.
    :param cuda_graphs: transformers on CUDA: replay short forward passes (decode steps, a warm
        turn's new message) as CUDA graphs over static KV caches (default: on where the model has
        only full-attention layers; see :mod:`local_llm_kit.backends._cuda_graphs`).
    :param prompt_lookup: prompt-lookup speculative decoding by default for this client's requests
        (``True``, ``False`` or the longest draft per forward pass; default off). Same output, fewer
        forward passes where replies copy their input; ``create(prompt_lookup=...)`` overrides it.

    Weights load on first use or on :meth:`load`.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._open_chat()

    def _open_chat(self) -> None:
        if self._remote is not None:
            from local_llm_kit.remote import RemoteCompletions

            self.chat = Chat(RemoteCompletions(self, self._remote))
        else:
            self.chat = Chat(Completions(self))

    def as_async(self) -> AsyncLLMClient:
        """An :class:`AsyncLLMClient` over the same model: for code that needs both interfaces.

        It has this client's settings and shares with it the loaded engine (one model in memory,
        one lease, so their generations queue as any two clients' do) and the conversation
        memory (one conversation: what either remembers, the other sends). With
        ``backend="openai"`` it talks to the same server with the same key, timeout and retries,
        over connections of its own. Each client closes only itself; the engine is let go of
        when the last of them closes, and until then the other keeps working.
        """
        return sibling(self, AsyncLLMClient)

    def load(self) -> LLMClient:
        """Load the weights now instead of on first use (``backend="openai"``: reach the server)."""
        _ = self.model if self._remote is not None else self.engine
        return self

    def close(self) -> None:
        """Release this client's hold on the model; the last open client of a model unloads it.

        Streams still open on the model stop with ``ModelUnloadedError`` at their next token.
        Other clients of the same weights are not affected. Idempotent.
        """
        self._close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncLLMClient(_BaseClient):
    """:class:`LLMClient` for asyncio: ``await client.chat.completions.create(...)``."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._open_chat()

    def _open_chat(self) -> None:
        if self._remote is not None:
            from local_llm_kit.remote import AsyncRemoteCompletions

            self.chat = AsyncChat(AsyncRemoteCompletions(self, self._remote))
        else:
            self.chat = AsyncChat(AsyncCompletions(self))

    def as_sync(self) -> LLMClient:
        """An :class:`LLMClient` over the same model, engine and memory (see :meth:`LLMClient.as_async`)."""
        return sibling(self, LLMClient)

    async def load(self) -> AsyncLLMClient:
        """Load the weights now, in a worker thread (see :meth:`LLMClient.load`)."""
        await asyncio.to_thread(lambda: self.model if self._remote is not None else self.engine)
        return self

    async def close(self) -> None:
        """Release this client's hold on the model (see :meth:`LLMClient.close`)."""
        await asyncio.to_thread(self._close)

    async def __aenter__(self) -> AsyncLLMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
