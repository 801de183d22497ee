"""``LLMClient`` and ``AsyncLLMClient``: OpenAI's chat API over a local model, in-process.

>>> client = LLMClient("smollm2-135m-instruct")
>>> reply = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}])
>>> reply.choices[0].message.content
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, overload

from local_llm_kit import chat as chat_path
from local_llm_kit.backends import BackendOptions
from local_llm_kit.config import (
    DEFAULT_MODEL,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    Settings,
    resolve_settings,
)
from local_llm_kit.engine import Engine, get_engine
from local_llm_kit.errors import InvalidRequestError, TokenLimitError
from local_llm_kit.memory import ConversationMemory
from local_llm_kit.models import ResolvedModel, resolve_model
from local_llm_kit.request import ChatRequest, normalize_messages, validate_request
from local_llm_kit.streaming import AsyncStream, ReplyCollector, Stream
from local_llm_kit.types import CompletionChunk, CompletionResponse, Message

__all__ = ["AsyncLLMClient", "LLMClient"]

logger = logging.getLogger(__name__)

# Parameters of OpenAI's API (and its Python client) that a local model cannot honour.
# Passing one with a value other than None raises instead of being dropped.
UNSUPPORTED_PARAMETERS = frozenset({
    "audio", "modalities", "prediction", "store", "metadata", "reasoning_effort", "service_tier",
    "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier", "extra_headers",
    "extra_query", "extra_body", "timeout",
})


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
    ) -> None:
        self.settings: Settings = resolve_settings(
            model=model, model_path=model_path, backend=backend, context_length=context_length,
            temperature=temperature, top_p=top_p, cache_dir=cache_dir, n_threads=n_threads,
            dtype=dtype, device=device,
        )
        self._explicit_model = model
        self._resolved: ResolvedModel | None = None
        self._engine: Engine | None = None
        self._load_lock = threading.Lock()
        self._memory: ConversationMemory | None = None

    # -- model ----------------------------------------------------------------------------
    @property
    def options(self) -> BackendOptions:
        s = self.settings
        return BackendOptions(n_ctx=s.context_length, cache_dir=s.cache_dir, n_threads=s.n_threads,
                              dtype=s.dtype, device=s.device)

    @property
    def model(self) -> str:
        """Name of the model as responses report it."""
        return self.resolved_model.name

    @property
    def resolved_model(self) -> ResolvedModel:
        if self._resolved is None:
            self._resolved = resolve_model(self._explicit_model, self.settings.model_path,
                                           self.settings.cache_dir, default=DEFAULT_MODEL)
        return self._resolved

    @property
    def engine(self) -> Engine:
        """The loaded model (loaded on first use, shared with clients of the same weights)."""
        if self._engine is None:
            with self._load_lock:
                if self._engine is None:
                    self._engine = get_engine(self.resolved_model, self.settings.backend, self.options)
        return self._engine

    def _engine_for(self, model: str | None) -> Engine:
        if model is None or model in (self._explicit_model, self.resolved_model.name):
            return self.engine
        other = resolve_model(model, self.settings.model_path, self.settings.cache_dir, default=DEFAULT_MODEL)
        return get_engine(other, self.settings.backend, self.options)

    def count_tokens(self, messages: Sequence[Mapping[str, Any]],
                     tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Exactly the ``prompt_tokens`` that ``create(messages=..., tools=...)`` reports.

        The real chat template is rendered (tools and generation prompt included) and tokenized
        by the model's tokenizer. Memory is not added: pass the history to count it.
        """
        request = ChatRequest.for_counting(normalize_messages(messages),
                                           [dict(t) for t in tools] if tools else None)
        return len(chat_path.encode_request(self.engine, request)[1])

    # -- memory ---------------------------------------------------------------------------
    def enable_memory(self, max_tokens: int = 1000) -> None:
        """Remember the conversation across ``create()`` calls, within ``max_tokens`` model tokens.

        Enabling again changes the budget and keeps what is remembered (trimmed to it).
        """
        if self._memory is None:
            self._memory = ConversationMemory(max_tokens, self._count_history)
        else:
            self._memory.max_tokens = ConversationMemory(max_tokens, self._count_history).max_tokens
            self._memory.replace(self._memory.messages)

    def disable_memory(self) -> None:
        """Stop remembering; what was remembered is dropped."""
        self._memory = None

    @property
    def memory_enabled(self) -> bool:
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
            self._memory = ConversationMemory(max_tokens, self._count_history)
        self._memory.replace(messages)

    def _require_memory(self, method: str) -> ConversationMemory:
        if self._memory is None:
            raise InvalidRequestError(f"{method}() needs memory: call enable_memory() first", param="memory")
        return self._memory

    def _count_history(self, messages: Sequence[dict[str, Any]]) -> int:
        return len(chat_path.encode_request(self.engine, ChatRequest.for_counting(messages))[1])

    def _validate(self, args: dict[str, Any], unsupported: Mapping[str, Any]) -> tuple[Engine, ChatRequest]:
        for name, value in unsupported.items():
            if name in UNSUPPORTED_PARAMETERS:
                if value is not None:
                    raise InvalidRequestError(f"{name} is not supported by local models", param=name)
            else:
                raise InvalidRequestError(f"unknown parameter {name!r}", param=name)
        if args.get("messages") is None:
            raise InvalidRequestError("messages is required", param="messages")
        engine = self._engine_for(args.get("model"))
        request = validate_request(args, default_temperature=self.settings.temperature,
                                   default_top_p=self.settings.top_p, n_vocab=engine.backend.info.n_vocab)
        return engine, request


class _Completions:
    def __init__(self, client: _BaseClient) -> None:
        self._client = client

    def _prepare(self, args: dict[str, Any], unsupported: Mapping[str, Any]) -> tuple[Engine, chat_path.PreparedChat]:
        engine, request = self._client._validate(args, unsupported)
        memory = self._client._memory
        if memory is None:
            return engine, chat_path.prepare(engine, request, self._client.model)
        # The remembered history goes first, trimmed further (oldest turns first) when the
        # whole prompt would not fit the context; a new system message replaces the old one.
        new = list(request.messages)
        replaces_system = any(m["role"] == "system" for m in new)
        error: TokenLimitError | None = None
        for dropped, history in enumerate(memory.candidates()):
            if replaces_system:
                history = [m for m in history if m["role"] != "system"]
                new = [m for m in new if m["role"] == "system"] + [m for m in new if m["role"] != "system"]
            try:
                prepared = chat_path.prepare(engine, replace(request, messages=tuple(history + new)),
                                             self._client.model)
            except TokenLimitError as exc:
                error = exc
                continue
            if dropped:
                logger.info("memory: left out the %d oldest turns to fit the context", dropped)
            return engine, prepared
        assert error is not None
        raise error

    def _remember(self, new_messages: Sequence[dict[str, Any]], reply: Message) -> None:
        """After a successful call: the new messages and the reply join the memory."""
        memory = self._client._memory
        if memory is not None:
            memory.add([*new_messages, *normalize_messages([reply.model_dump(exclude_none=True)])])


class Completions(_Completions):
    @overload
    def create(self, *, messages: Iterable[Mapping[str, Any]], stream: Literal[False] = False,
               **kwargs: Any) -> CompletionResponse: ...

    @overload
    def create(self, *, messages: Iterable[Mapping[str, Any]], stream: Literal[True],
               **kwargs: Any) -> Stream[CompletionChunk]: ...

    def create(
        self,
        *,
        messages: Iterable[Mapping[str, Any]],
        model: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        stream: bool = False,
        stream_options: Mapping[str, Any] | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        n: int | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[str | int, float] | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        user: str | None = None,
        response_format: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        functions: Sequence[Mapping[str, Any]] | None = None,
        function_call: str | Mapping[str, Any] | None = None,
        **unsupported: Any,
    ) -> CompletionResponse | Stream[CompletionChunk]:
        """Create a chat completion, exactly as ``openai.OpenAI().chat.completions.create``.

        Returns a :class:`CompletionResponse`, or with ``stream=True`` a :class:`Stream` of
        :class:`CompletionChunk`. Parameters a local model cannot honour raise
        :class:`InvalidRequestError` naming them.
        """
        args = dict(locals())
        args.pop("self"), args.pop("unsupported"), args.pop("__class__", None)
        engine, prepared = self._prepare(args, unsupported)
        new_messages = normalize_messages(args["messages"])
        if prepared.request.stream:
            collector = ReplyCollector()
            return Stream(collector.watch(chat_path.stream(engine, prepared)),
                          on_complete=lambda: self._remember(new_messages, collector.message()))
        response = chat_path.complete(engine, prepared)
        self._remember(new_messages, response.choices[0].message)
        return response


class AsyncCompletions(_Completions):
    @overload
    async def create(self, *, messages: Iterable[Mapping[str, Any]], stream: Literal[False] = False,
                     **kwargs: Any) -> CompletionResponse: ...

    @overload
    async def create(self, *, messages: Iterable[Mapping[str, Any]], stream: Literal[True],
                     **kwargs: Any) -> AsyncStream[CompletionChunk]: ...

    async def create(self, **kwargs: Any) -> CompletionResponse | AsyncStream[CompletionChunk]:
        """Same parameters as :meth:`Completions.create`; generation runs off the event loop."""
        cancel = threading.Event()
        args = {name: kwargs.pop(name, None) for name in _CREATE_PARAMETERS}
        args["stream"] = bool(args["stream"])
        if args.get("messages") is None:
            raise InvalidRequestError("messages is required", param="messages")
        # Loading and tokenizing may take a while on first use: keep them off the loop too.
        engine, prepared = await asyncio.to_thread(self._prepare, args, kwargs)
        new_messages = normalize_messages(args["messages"])
        if prepared.request.stream:
            collector = ReplyCollector()
            return AsyncStream(lambda cancel: collector.watch(chat_path.stream(engine, prepared, cancel)),
                               on_complete=lambda: self._remember(new_messages, collector.message()))
        worker = asyncio.ensure_future(asyncio.to_thread(chat_path.complete, engine, prepared, cancel))
        try:
            response = await asyncio.shield(worker)
        except asyncio.CancelledError:
            cancel.set()  # the worker stops before its next token
            raise
        self._remember(new_messages, response.choices[0].message)
        return response


_CREATE_PARAMETERS = tuple(
    name for name in inspect.signature(Completions.create).parameters if name not in ("self", "unsupported")
)


class _Chat:
    def __init__(self, completions: Any) -> None:
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
    :param backend: ``'llama.cpp'`` (default) or ``'transformers'``.

    Weights load on first use or on :meth:`load`.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.chat = _Chat(Completions(self))

    def load(self) -> LLMClient:
        """Load the weights now instead of on first use."""
        _ = self.engine
        return self


class AsyncLLMClient(_BaseClient):
    """:class:`LLMClient` for asyncio: ``await client.chat.completions.create(...)``."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.chat = _Chat(AsyncCompletions(self))

    async def load(self) -> AsyncLLMClient:
        await asyncio.to_thread(lambda: self.engine)
        return self
