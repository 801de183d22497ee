"""``ChatLocalLLMKit``: a LangChain chat model over local_llm_kit's in-process OpenAI-shaped client.

Every call becomes one ``client.chat.completions.create(...)``: LangChain messages are converted
to OpenAI dicts, bound tools / ``tool_choice`` / ``response_format`` are passed in OpenAI's shape,
and the client's guarantees carry over unchanged (tool-call arguments and JSON always valid,
exact token counts, unsupported parameters rejected with ``InvalidRequestError``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, Literal, TypeVar, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams, LanguageModelInput, ModelProfile
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator
from typing_extensions import Self

from langchain_local_llm_kit.messages import ai_message_from_openai, to_openai_messages
from local_llm_kit import AsyncLLMClient, CompletionChunk, CompletionResponse, GenerationTimeoutError, LLMClient

__all__ = ["ChatLocalLLMKit"]

logger = logging.getLogger(__name__)

PROVIDER = "local_llm_kit"

# Settings that choose and load the weights: they belong to the client, so they cannot be given
# together with ``client=``.
_LOAD_FIELDS = ("model_path", "backend", "context_length", "cache_dir", "n_threads", "dtype", "device")
# Request parameters with a model-level default, sent with every call unless a call overrides them.
_REQUEST_FIELDS = ("temperature", "top_p", "max_tokens", "seed", "presence_penalty", "frequency_penalty",
                   "logit_bias", "logprobs", "top_logprobs", "n")

_T = TypeVar("_T")


def _is_pydantic_class(obj: Any) -> bool:
    return isinstance(obj, type) and is_basemodel_subclass(obj)


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageMetadata:
    return UsageMetadata(input_tokens=prompt_tokens, output_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)


def _response_format(schema: Any, strict: bool | None) -> dict[str, Any]:
    """``response_format`` in OpenAI's shape for a pydantic class, TypedDict, JSON Schema or OpenAI dict."""
    if isinstance(schema, Mapping) and schema.get("type") in ("json_schema", "json_object", "text"):
        return dict(schema)  # already OpenAI's shape (what create_agent's ProviderStrategy binds)
    function = convert_to_openai_tool(schema, strict=strict)["function"]
    spec: dict[str, Any] = {"name": function["name"], "schema": function.get("parameters", {})}
    if function.get("description"):
        spec["description"] = function["description"]
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


class ChatLocalLLMKit(BaseChatModel):
    """A local model (llama.cpp or transformers, in-process) as a LangChain chat model.

    >>> from langchain_local_llm_kit import ChatLocalLLMKit
    >>> model = ChatLocalLLMKit(temperature=0, max_tokens=64)      # the embedded SmolLM2 135M
    >>> model.invoke("Give me a synonym for happy.").content

    The fields mirror :class:`local_llm_kit.LLMClient` (load settings) and
    ``chat.completions.create`` (per-request defaults); or pass an existing ``client=``.
    Weights load on first use; models over the same weights and load settings share one
    loaded model (the client shares engines).
    """

    model_name: str | None = Field(default=None, alias="model")
    """Packaged model alias, GGUF file or Hugging Face folder (default: the embedded SmolLM2)."""
    model_path: str | None = None
    backend: str | None = None
    """``'llama.cpp'`` (default) or ``'transformers'``."""
    context_length: int | None = None
    cache_dir: str | None = None
    n_threads: int | None = None
    dtype: str | None = None
    device: str | None = None

    temperature: float | None = None
    """Sampling temperature (the client's default, 0.7, when None); 0 is greedy."""
    top_p: float | None = None
    max_tokens: int | None = Field(default=None, alias="max_completion_tokens")
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    n: int | None = None

    streaming: bool = False
    """Generate through the streaming path even for ``invoke`` (callbacks see every token)."""
    timeout: float | None = Field(default=None, alias="request_timeout")
    """Seconds a call may take; past it generation stops before its next token and
    :class:`local_llm_kit.GenerationTimeoutError` (a :class:`TimeoutError`) is raised. None: no limit."""
    max_retries: int = Field(default=2, ge=0)
    """How many times a non-streaming call that timed out is retried (as OpenAI's client retries
    timeouts). A local model has no other transient failure, so nothing else is retried."""
    api_key: SecretStr | None = Field(default=None, exclude=True)
    """Accepted so that code written for ``ChatOpenAI(api_key=...)`` runs unchanged; an in-process
    model has nothing to authenticate, so it is not used for anything."""

    client: Any = Field(default=None, exclude=True)
    """The :class:`local_llm_kit.LLMClient` used for sync calls (built from the fields when None)."""
    async_client: Any = Field(default=None, exclude=True)
    """The :class:`local_llm_kit.AsyncLLMClient` for async calls (created on first async use, over
    the same loaded model)."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", protected_namespaces=(),
                              arbitrary_types_allowed=True)

    _async_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    # -- construction ------------------------------------------------------------------------
    @model_validator(mode="after")
    def _build_client(self) -> Self:
        given = self.client if self.client is not None else self.async_client
        if given is not None:
            if self.client is not None and not isinstance(self.client, LLMClient):
                raise ValueError(f"client must be a local_llm_kit.LLMClient, got {type(self.client).__name__}")
            if self.async_client is not None and not isinstance(self.async_client, AsyncLLMClient):
                raise ValueError("async_client must be a local_llm_kit.AsyncLLMClient, "
                                 f"got {type(self.async_client).__name__}")
            clashing = [name for name in _LOAD_FIELDS if getattr(self, name) is not None]
            if clashing:
                raise ValueError(f"{clashing[0]} cannot be combined with client=: the client already chose "
                                 "its weights and load settings")
            if self.model_name is not None and self.model_name != given.settings.model:
                raise ValueError(f"model={self.model_name!r} disagrees with the client's model "
                                 f"{given.settings.model!r}; pass one of them")
        else:
            self.client = LLMClient(self.model_name, model_path=self.model_path, backend=self.backend,
                                    context_length=self.context_length, cache_dir=self.cache_dir,
                                    n_threads=self.n_threads, dtype=self.dtype, device=self.device)
            given = self.client
        if given.memory_enabled:
            raise ValueError("the client has conversation memory enabled, which would add its history to every "
                             "LangChain call; disable it and use ConversationMemoryMiddleware (or a checkpointer)")
        # Show the resolved settings (arguments > LOCAL_LLM_KIT_* environment > defaults).
        settings = given.settings
        self.model_name = settings.model
        self.backend = settings.backend
        self.context_length = settings.context_length
        if self.profile is None:  # LangChain's validator ran before the settings were known
            self.profile = self._resolve_model_profile()
        return self

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["langchain_local_llm_kit", "chat_models"]

    @property
    def sync_client(self) -> LLMClient:
        if self.client is None:
            self.client = cast(AsyncLLMClient, self.async_client).as_sync()
        return cast(LLMClient, self.client)

    @property
    def aclient(self) -> AsyncLLMClient:
        """The async client, created on first use over the same loaded model as :attr:`sync_client`."""
        if self.async_client is None:
            with self._async_lock:
                if self.async_client is None:
                    self.async_client = cast(LLMClient, self.client).as_async()
        return cast(AsyncLLMClient, self.async_client)

    # -- LangChain metadata ------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "local-llm-kit"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"model_name": self.model_name, "backend": self.backend,
                                  "context_length": self.context_length}
        if self.model_path is not None:
            params["model_path"] = self.model_path
        params.update({name: getattr(self, name) for name in _REQUEST_FIELDS if getattr(self, name) is not None})
        return params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=PROVIDER, ls_model_type="chat",
                                 ls_model_name=str(kwargs.get("model") or self.model_name))
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stop = stop if stop is not None else self.stop
        if stop:
            params["ls_stop"] = list(stop)
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        if self.client is None and self.async_client is None:
            return None  # called by LangChain's validator, before ours has resolved the settings
        # Everything here is a property of the library, not of a particular model file: constrained
        # decoding makes tool calls and JSON schema output available for every model it loads.
        return ModelProfile(
            max_input_tokens=self.context_length or 0,
            text_inputs=True, image_inputs=False, image_url_inputs=False, pdf_inputs=False, audio_inputs=False,
            video_inputs=False, image_tool_message=False, pdf_tool_message=False,
            text_outputs=True, image_outputs=False, audio_outputs=False, video_outputs=False,
            reasoning_output=False, tool_calling=True, tool_choice=True, tool_call_streaming=True,
            structured_output=True, temperature=True, open_weights=True,
        )

    # -- token counting ----------------------------------------------------------------------
    def get_token_ids(self, text: str) -> list[int]:
        """The model's own token ids for ``text`` (no chat template, no BOS)."""
        return self.sync_client.engine.backend.tokenize(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                     tools: Sequence[Any] | None = None) -> int:
        """Exactly the ``input_tokens`` a call with these messages (and tools) reports.

        The model's chat template is rendered (tools and the generation prompt included) and
        tokenized by its tokenizer, so ``trim_messages(..., token_counter=model)`` is exact.
        """
        formatted = [convert_to_openai_tool(t) for t in tools] if tools else None
        return self.sync_client.count_tokens(to_openai_messages(messages), tools=formatted)

    # -- requests ----------------------------------------------------------------------------
    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any],
                 *, stream: bool) -> dict[str, Any]:
        params: dict[str, Any] = {name: getattr(self, name) for name in _REQUEST_FIELDS
                                  if getattr(self, name) is not None}
        stop = stop if stop is not None else self.stop
        if stop:
            params["stop"] = list(stop)
        if self.timeout is not None:
            params["timeout"] = self.timeout  # the client stops generation between tokens when it passes
        kwargs = dict(kwargs)
        kwargs.pop("stream", None)  # LangChain's own routing flag; the path is chosen by stream=
        if kwargs.get("response_format") is not None:  # a pydantic class or schema, as ChatOpenAI takes
            kwargs["response_format"] = _response_format(kwargs["response_format"], None)
        params.update(kwargs)
        params["messages"] = to_openai_messages(messages)
        if stream:
            if (params.get("n") or 1) > 1:
                raise ValueError("n > 1 cannot be streamed through LangChain (its streams carry one message)")
            params["stream"] = True
            params["stream_options"] = {"include_usage": True}  # usage exactly once, on the last chunk
        return params

    def _result(self, response: CompletionResponse) -> ChatResult:
        usage = _usage(response.usage.prompt_tokens, response.usage.completion_tokens)
        generations = []
        for choice in response.choices:
            message = ai_message_from_openai(choice.message)
            message.id = response.id if len(response.choices) == 1 else f"{response.id}-{choice.index}"
            message.usage_metadata = usage
            metadata: dict[str, Any] = {"model_name": response.model, "finish_reason": choice.finish_reason,
                                        "system_fingerprint": response.system_fingerprint,
                                        "model_provider": PROVIDER}
            info: dict[str, Any] = {"finish_reason": choice.finish_reason}
            if choice.logprobs is not None:
                metadata["logprobs"] = info["logprobs"] = choice.logprobs.model_dump()
            if choice.message.schema_violations:
                metadata["schema_violations"] = list(choice.message.schema_violations)
            message.response_metadata = metadata
            generations.append(ChatGeneration(message=message, generation_info=info))
        return ChatResult(generations=generations,
                          llm_output={"token_usage": response.usage.model_dump(), "model_name": response.model,
                                      "system_fingerprint": response.system_fingerprint})

    def _combine_llm_outputs(self, llm_outputs: list[dict[str, Any] | None]) -> dict[str, Any]:
        """One ``llm_output`` for a ``generate()`` over several prompts: token usage summed."""
        usage: dict[str, int] = {}
        combined: dict[str, Any] = {"model_name": self.model_name}
        for output in llm_outputs:
            if not output:
                continue
            for key, value in (output.get("token_usage") or {}).items():
                if isinstance(value, int):
                    usage[key] = usage.get(key, 0) + value
            combined["system_fingerprint"] = output.get("system_fingerprint")
        combined["token_usage"] = usage
        return combined

    @staticmethod
    def _chunks(chunk: CompletionChunk) -> Iterator[ChatGenerationChunk]:
        """LangChain chunks for one client chunk (none for the opening role-only chunk)."""
        if chunk.usage is not None and not chunk.choices:
            # The client sends usage last (include_usage): this is the stream's final chunk.
            yield ChatGenerationChunk(message=AIMessageChunk(
                content="", usage_metadata=_usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens),
                response_metadata={"model_name": chunk.model, "system_fingerprint": chunk.system_fingerprint,
                                   "model_provider": PROVIDER},
                chunk_position="last"))
            return
        for choice in chunk.choices:
            delta = choice.delta
            calls = [tool_call_chunk(name=call.function.name if call.function else None,
                                     args=call.function.arguments if call.function else None,
                                     id=call.id, index=call.index)
                     for call in delta.tool_calls or ()]
            if not (delta.content or calls or choice.finish_reason or choice.logprobs or delta.schema_violations):
                continue
            metadata: dict[str, Any] = {}
            info: dict[str, Any] | None = None
            if delta.schema_violations:  # the client's last delta of a reply that broke a checked keyword
                metadata["schema_violations"] = list(delta.schema_violations)
            if choice.finish_reason is not None:
                metadata["finish_reason"] = choice.finish_reason
                info = {"finish_reason": choice.finish_reason}
            if choice.logprobs is not None:
                info = {**(info or {}), "logprobs": choice.logprobs.model_dump()}
            yield ChatGenerationChunk(
                message=AIMessageChunk(content=delta.content or "", tool_call_chunks=calls,
                                       response_metadata=metadata),
                generation_info=info)

    # -- sync --------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        params = self._request(messages, stop, kwargs, stream=False)
        create = self.sync_client.chat.completions.create
        for attempt in range(self.max_retries + 1):
            try:
                return _parsed(self._result(create(**params)), kwargs.get("response_format"))
            except GenerationTimeoutError:
                if attempt == self.max_retries:
                    raise
                logger.warning("generation timed out after %s s; retrying (%d of %d)", self.timeout,
                               attempt + 1, self.max_retries)
        raise AssertionError("unreachable")

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        params = self._request(messages, stop, kwargs, stream=True)
        # A stream that has started is not retried (its tokens have been shown): a timeout raises.
        with self.sync_client.chat.completions.create(**params) as stream:
            for chunk in stream:
                for generation in self._chunks(chunk):
                    if run_manager is not None:
                        run_manager.on_llm_new_token(generation.text, chunk=generation)
                    yield generation

    # -- async -------------------------------------------------------------------------------
    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        params = self._request(messages, stop, kwargs, stream=False)
        create = self.aclient.chat.completions.create
        for attempt in range(self.max_retries + 1):
            try:
                return _parsed(self._result(await create(**params)), kwargs.get("response_format"))
            except GenerationTimeoutError:
                if attempt == self.max_retries:
                    raise
                logger.warning("generation timed out after %s s; retrying (%d of %d)", self.timeout,
                               attempt + 1, self.max_retries)
        raise AssertionError("unreachable")

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        params = self._request(messages, stop, kwargs, stream=True)
        stream = await self.aclient.chat.completions.create(**params)
        try:
            async for chunk in stream:
                for generation in self._chunks(chunk):
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(generation.text, chunk=generation)
                    yield generation
        finally:
            # Reached when the stream ends, fails, or its consumer stops early or is cancelled:
            # the worker thread stops before computing another token.
            await stream.aclose()

    # -- tools and structured output ---------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | type | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (LangChain tools, pydantic classes, functions, TypedDicts, OpenAI dicts).

        ``tool_choice``: ``"auto"``, ``"none"``, ``"required"``/``"any"``/``True`` (some tool must be
        called), a tool name, or an OpenAI dict. The client's constrained decoding makes every
        call's arguments valid for its tool's schema. ``response_format`` (OpenAI's shape, or a
        schema) constrains text replies, as ``create_agent``'s ``ProviderStrategy`` binds it.
        """
        formatted = [convert_to_openai_tool(tool, strict=strict) for tool in tools]
        names = [tool["function"]["name"] for tool in formatted]
        if formatted:
            kwargs["tools"] = formatted
        if tool_choice is not None:
            choice = _tool_choice(tool_choice, names)
            if choice is not None and formatted:  # "none" without tools: nothing to choose from
                kwargs["tool_choice"] = choice
        if parallel_tool_calls is not None:
            if not formatted:
                raise ValueError("parallel_tool_calls needs at least one tool")
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        if response_format is not None:
            kwargs["response_format"] = _response_format(response_format, strict)
        return super().bind(**kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable whose output matches ``schema`` (a pydantic class, TypedDict or JSON Schema).

        - ``"json_schema"`` (default): the reply is constrained to the schema by the decoder, so
          it always parses;
        - ``"function_calling"``: the model is forced to call one tool whose arguments are the
          schema (equally constrained);
        - ``"json_mode"``: a JSON object reply; with a schema, constrained to it as well.
        """
        if kwargs:
            raise ValueError(f"with_structured_output got unsupported arguments {sorted(kwargs)}")
        is_pydantic = _is_pydantic_class(schema)
        ls_format: dict[str, Any]
        parser: Runnable[Any, Any]
        model: Runnable[LanguageModelInput, Any]
        if method in ("json_schema", "function_calling") and schema is None:
            raise ValueError(f"schema is required with method={method!r}")
        if method == "json_schema":
            assert schema is not None
            ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": convert_to_openai_tool(schema)}
            model = self.bind(response_format=_response_format(schema, strict), ls_structured_output_format=ls_format)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        elif method == "function_calling":
            assert schema is not None
            name = convert_to_openai_tool(schema)["function"]["name"]
            ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
            model = self.bind_tools([schema], tool_choice=name, parallel_tool_calls=False,  # type: ignore[list-item]
                                    strict=strict, ls_structured_output_format=ls_format)
            parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic  # type: ignore[list-item]
                      else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method == "json_mode":
            response_format: dict[str, Any] = {"type": "json_object"}
            if schema is not None:
                function = convert_to_openai_tool(schema)["function"]
                response_format["schema"] = function.get("parameters", {})
            ls_format = {"kwargs": {"method": method}, "schema": schema}
            model = self.bind(response_format=response_format, ls_structured_output_format=ls_format)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()  # type: ignore[arg-type]
        else:
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}")
        if not include_raw:
            return model | parser
        parser_assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
        with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return RunnableMap(raw=model) | with_fallback


def _parsed(result: ChatResult, response_format: Any) -> ChatResult:
    """With a pydantic class as ``response_format``, each reply's object in
    ``additional_kwargs["parsed"]``, as ChatOpenAI gives it (the JSON is the schema's: decoding
    was constrained to it)."""
    if isinstance(response_format, type) and issubclass(response_format, BaseModel):
        for generation in result.generations:
            message = generation.message
            if isinstance(message.content, str) and message.content and not getattr(message, "tool_calls", None):
                message.additional_kwargs["parsed"] = response_format.model_validate_json(message.content)
    return result


def _tool_choice(choice: dict[str, Any] | str | bool, names: list[str]) -> dict[str, Any] | str | None:
    """LangChain's ``tool_choice`` spellings in OpenAI's shape; a name must be a bound tool."""
    if not names and choice not in ("none", False):
        raise ValueError(f"tool_choice={choice!r} needs at least one bound tool")
    if choice is True:
        return "required"  # as ChatOpenAI: some bound tool must be called (with one bound, that one)
    if choice is False:
        return None  # not forcing: the client's default ("auto" with tools)
    if isinstance(choice, str):
        if choice in ("auto", "none", "required"):
            return choice
        if choice == "any":
            return "required"
        if choice in names:
            return {"type": "function", "function": {"name": choice}}
        raise ValueError(f"tool_choice={choice!r} is neither 'auto', 'none', 'any', 'required' nor the name of a "
                         f"bound tool {names}")
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if choice.get("type") == "function" and name is not None and name not in names:
            raise ValueError(f"tool_choice names {name!r}, which is not a bound tool {names}")
        return dict(choice)
    raise ValueError(f"tool_choice must be a string, a bool or an OpenAI dict, got {type(choice).__name__}")
