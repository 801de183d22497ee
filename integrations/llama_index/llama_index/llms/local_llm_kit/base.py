"""``LocalLLMKit``: a LlamaIndex function-calling LLM over local_llm_kit's in-process client.

>>> from llama_index.core import Settings
>>> from llama_index.llms.local_llm_kit import LocalLLMKit
>>> Settings.llm = LocalLLMKit(temperature=0, max_tokens=128)    # the embedded SmolLM2
>>> Settings.llm.complete("Say hi").text

Every call goes through ``client.chat.completions.create`` (one request path: parameters are
validated there and an unsupported one raises ``InvalidRequestError``). Tool calls and
structured output use the client's constrained decoding, so arguments and JSON always parse.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_NUM_OUTPUTS
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.prompts import PromptTemplate
from llama_index.core.types import PydanticProgramMode
from llama_index.llms.local_llm_kit import _convert, _structured
from llama_index.llms.local_llm_kit._structured import Model
from llama_index_instrumentation import get_dispatcher

from local_llm_kit import AsyncLLMClient, InvalidRequestError, LLMClient

if TYPE_CHECKING:
    from llama_index.core.program.utils import FlexibleModel
    from llama_index.core.tools.types import BaseTool

__all__ = ["LocalLLMKit"]

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)

_TOOL_CHOICES = ("auto", "none", "required")
# LocalLLMKit fields that are LLMClient settings (given to the client it creates).
_CLIENT_SETTINGS = ("model_path", "backend", "context_length", "cache_dir", "n_threads", "dtype", "device",
                    "base_url", "api_key", "max_retries")
# Names other LlamaIndex LLMs use for a field of ours (a typo gets the closest field name instead).
_OTHER_NAMES = {"context_window": "context_length", "num_ctx": "context_length", "n_ctx": "context_length",
                "request_timeout": "timeout", "model_name": "model", "num_output": "max_tokens",
                "max_new_tokens": "max_tokens", "model_kwargs": "additional_kwargs",
                "generate_kwargs": "additional_kwargs"}


class LocalLLMKit(FunctionCallingLLM):
    """A local model (llama.cpp or transformers, in-process) as a LlamaIndex function-calling LLM.

    Either give the client's settings as fields, or an existing client: ``LocalLLMKit(client=c)``
    (the async client is then ``c.as_async()``, over the same loaded model; or pass both).
    The client is created on first use; clients of the same weights and settings share one
    loaded model, so many ``LocalLLMKit`` instances cost one model's memory.
    """

    model: str | None = Field(default=None, description="Packaged model alias, GGUF file or HF folder; "
                              "None: LOCAL_LLM_KIT_MODEL_PATH or the embedded SmolLM2.")
    model_path: str | None = Field(default=None, description="Weights to load, or a folder searched for `model`.")
    backend: str | None = Field(default=None, description="'llama.cpp' (default) or 'transformers'.")
    context_length: int | None = Field(default=None, description="Context window in tokens (default 2048).")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0,
                                      description="Sampling temperature; None: the client's default (0.7).")
    top_p: float | None = Field(default=None, ge=0.0, le=1.0, description="Nucleus mass; None: the client's default.")
    max_tokens: int = Field(default=DEFAULT_NUM_OUTPUTS, gt=0, description="Most tokens generated per call.")
    cache_dir: str | None = Field(default=None, description="Converted/assembled models (LOCAL_LLM_KIT_CACHE_DIR).")
    n_threads: int | None = Field(default=None, description="CPU threads of the engine.")
    dtype: str | None = Field(default=None, description="transformers backend dtype.")
    device: str | None = Field(default=None, description="transformers backend device.")
    base_url: str | None = Field(default=None, description="backend='openai': the server's URL up to /v1.")
    api_key: str | None = Field(default=None, exclude=True, repr=False, description="backend='openai': bearer key.")
    timeout: float | None = Field(default=None, gt=0, description="Seconds a call may take: in-process, generation "
                                  "stops before its next token and GenerationTimeoutError is raised; "
                                  "backend='openai': the HTTP request's timeout.")
    max_retries: int | None = Field(default=None, description="backend='openai': retries of a failed request.")
    additional_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="More create() parameters for every call (seed, stop, ...).")

    _client: LLMClient | None = PrivateAttr(default=None)
    _async_client: AsyncLLMClient | None = PrivateAttr(default=None)

    def __init__(self, model: str | None = None, *, client: LLMClient | None = None,
                 async_client: AsyncLLMClient | None = None, **kwargs: Any) -> None:
        _check_field_names(kwargs)
        given = client or async_client
        if given is not None:
            clashing = sorted(k for k in _CLIENT_SETTINGS if kwargs.get(k) is not None)
            if model is not None or clashing:
                name = "model" if model is not None else clashing[0]
                raise InvalidRequestError(f"{name} cannot be combined with client=: the client's settings apply",
                                          param=name)
            settings = given.settings
            model, kwargs["backend"], kwargs["context_length"] = (settings.model, settings.backend,
                                                                  settings.context_length)
        super().__init__(model=model, **kwargs)
        # Created now (the weights load on first use) so that bad settings raise here, not at the first call.
        self._client = client if given is not None else LLMClient(**self._settings_kwargs())
        self._async_client = async_client

    @classmethod
    def class_name(cls) -> str:
        return "LocalLLMKit"

    # -- the client ---------------------------------------------------------------------
    def _settings_kwargs(self) -> dict[str, Any]:
        kwargs = {name: getattr(self, name) for name in _CLIENT_SETTINGS if getattr(self, name) is not None}
        return {"model": self.model, **kwargs}

    @property
    def client(self) -> LLMClient:
        """The synchronous client (created on first use; the model loads on its first call)."""
        if self._client is None:
            self._client = self._async_client.as_sync() if self._async_client is not None else \
                LLMClient(**self._settings_kwargs())
        return self._client

    @property
    def async_client(self) -> AsyncLLMClient:
        """The asyncio client: same weights, so the same loaded engine as :attr:`client`."""
        if self._async_client is None:
            self._async_client = self._client.as_async() if self._client is not None else \
                AsyncLLMClient(**self._settings_kwargs())
        return self._async_client

    def _checked(self, client: LLMClient | AsyncLLMClient) -> Any:
        if client.memory_enabled:
            # LlamaIndex sends the whole history with every call; the client's memory would add it twice.
            raise InvalidRequestError("the client has memory enabled: LlamaIndex passes the history itself; "
                                      "use LocalLLMKitMemory instead of client.enable_memory()", param="client")
        return client.chat.completions

    @property
    def tokenizer_fn(self) -> Callable[[str], list[int]]:
        """Text -> the model's token ids (for ``Settings.tokenizer`` or ``Memory.from_defaults``).

        In-process backends only: with ``backend="openai"`` the server owns the tokenizer (calling
        the function raises); ``LocalLLMKitMemory`` still counts exactly there, through the client.
        """
        client = self.client

        def tokenize(text: str) -> list[int]:
            ids: list[int] = client.engine.backend.tokenize(text)
            return ids

        return tokenize

    @property
    def metadata(self) -> LLMMetadata:
        client = self._client or self._async_client or self.client
        # The configured context is the engine's (llama.cpp's rounding up is not used): reading
        # metadata does not load the model.
        return LLMMetadata(context_window=client.settings.context_length, num_output=self.max_tokens,
                           is_chat_model=True, is_function_calling_model=True, model_name=client.model,
                           system_role=MessageRole.SYSTEM)

    # -- request parameters -------------------------------------------------------------------
    def _params(self, kwargs: dict[str, Any], *, stream: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.timeout is not None:
            params["timeout"] = self.timeout
        params.update(self.additional_kwargs)
        params.update(kwargs)
        if "stream" in params:
            raise InvalidRequestError("stream is chosen by the method: use stream_chat()/astream_chat()",
                                      param="stream")
        if params.get("n") not in (None, 1):
            raise InvalidRequestError("n must be 1: a LlamaIndex ChatResponse holds one message", param="n")
        if stream:
            options = dict(params.pop("stream_options", None) or {})
            options["include_usage"] = True
            params.update(stream=True, stream_options=options)
        elif "stream_options" in params:
            raise InvalidRequestError("stream_options applies only to streaming calls", param="stream_options")
        return params

    # -- chat ------------------------------------------------------------------------------------
    # The public methods carry LlamaIndex's callback decorators; complete() and its kin call the
    # undecorated ones, so that one call is one LLM event (token counters would count it twice).
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, **kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, **kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._achat(messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return await self._astream_chat(messages, **kwargs)

    def _chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        completions = self._checked(self.client)
        response = completions.create(messages=_convert.to_openai_messages(messages), **self._params(kwargs))
        return _convert.chat_response_from_completion(response)

    def _stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        completions = self._checked(self.client)
        # Created here, not in the generator, so a bad request raises at the call.
        stream = completions.create(messages=_convert.to_openai_messages(messages),
                                    **self._params(kwargs, stream=True))

        def gen() -> Generator[ChatResponse, None, None]:
            accumulator = _convert.StreamAccumulator()
            with stream:  # closing the generator stops generation before the next token
                for chunk in stream:
                    yield accumulator.add(chunk)

        return gen()

    async def _achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        completions = self._checked(self.async_client)
        # Generation runs in a worker thread; cancelling this task stops it before its next token.
        response = await completions.create(messages=_convert.to_openai_messages(messages), **self._params(kwargs))
        return _convert.chat_response_from_completion(response)

    async def _astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        completions = self._checked(self.async_client)
        stream = await completions.create(messages=_convert.to_openai_messages(messages),
                                          **self._params(kwargs, stream=True))

        async def gen() -> AsyncGenerator[ChatResponse, None]:
            accumulator = _convert.StreamAccumulator()
            try:
                async for chunk in stream:
                    yield accumulator.add(chunk)
            finally:  # closed early or cancelled: the worker stops before its next token
                await stream.aclose()

        return gen()

    # -- completion (a chat with one user message) --------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _convert.completion_from_chat(self._chat([_user(prompt)], **kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        responses = self._stream_chat([_user(prompt)], **kwargs)

        def gen() -> Generator[CompletionResponse, None, None]:
            for response in responses:
                yield _convert.completion_from_chat(response)

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _convert.completion_from_chat(await self._achat([_user(prompt)], **kwargs))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        responses = await self._astream_chat([_user(prompt)], **kwargs)

        async def gen() -> AsyncGenerator[CompletionResponse, None]:
            async for response in responses:
                yield _convert.completion_from_chat(response)

        return gen()

    # -- tools -----------------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """create() arguments for a chat with tools; ``chat_history`` is copied, never appended to."""
        specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str)
                            else user_msg)
        if not specs:
            if tool_required or tool_choice not in (None, "none", "auto"):
                raise InvalidRequestError("a tool call was required but no tools were given", param="tools")
            return {"messages": messages, **kwargs}
        names = [spec["function"]["name"] for spec in specs]
        return {"messages": messages, "tools": specs, "tool_choice": _tool_choice(tool_choice, tool_required, names),
                "parallel_tool_calls": allow_parallel_tool_calls, **kwargs}

    def _validate_chat_with_tools_response(self, response: ChatResponse, tools: Sequence[BaseTool],
                                           allow_parallel_tool_calls: bool = False, **kwargs: Any) -> ChatResponse:
        # parallel_tool_calls=False is enforced by the grammar: at most one call can be generated.
        return response

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        """The tool calls of a response (``ToolCallBlock``s, or the older ``additional_kwargs`` form)."""
        return _convert.tool_selections(response, error_on_no_tool_call)

    # -- structured output (constrained JSON-schema decoding) ---------------------------------
    @dispatcher.span
    def structured_predict(self, output_cls: type[Model], prompt: PromptTemplate,
                           llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any) -> Model:
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            result: Model = super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
            return result
        messages, kwargs = _structured.start(self, output_cls, prompt, llm_kwargs, prompt_args)
        return _structured.finish(output_cls, self.chat(messages, **kwargs))

    @dispatcher.span
    async def astructured_predict(self, output_cls: type[Model], prompt: PromptTemplate,
                                  llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any) -> Model:
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            aresult: Model = await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
            return aresult
        messages, kwargs = _structured.start(self, output_cls, prompt, llm_kwargs, prompt_args)
        return _structured.finish(output_cls, await self.achat(messages, **kwargs))

    @dispatcher.span
    def stream_structured_predict(self, output_cls: type[Model], prompt: PromptTemplate,
                                  llm_kwargs: dict[str, Any] | None = None,
                                  **prompt_args: Any) -> Generator[Model | FlexibleModel, None, None]:
        """Partial objects as the JSON grows; the last item is the validated ``output_cls`` instance."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super().stream_structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        messages, kwargs = _structured.start(self, output_cls, prompt, llm_kwargs, prompt_args)
        return _structured.stream(output_cls, self.stream_chat(messages, **kwargs))

    @dispatcher.span
    async def astream_structured_predict(self, output_cls: type[Model], prompt: PromptTemplate,
                                         llm_kwargs: dict[str, Any] | None = None,
                                         **prompt_args: Any) -> AsyncGenerator[Model | FlexibleModel, None]:
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astream_structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        messages, kwargs = _structured.start(self, output_cls, prompt, llm_kwargs, prompt_args)
        return _structured.astream(output_cls, await self.astream_chat(messages, **kwargs))


def _check_field_names(kwargs: dict[str, Any]) -> None:
    """Raise on a keyword that is no field: pydantic would drop it without a word (a misspelled
    ``temprature``, or ``context_window`` as other LlamaIndex LLMs call it, would do nothing)."""
    fields = set(LocalLLMKit.model_fields)
    for name in sorted(set(kwargs) - fields):
        other = _OTHER_NAMES.get(name) or next(iter(difflib.get_close_matches(name, fields, n=1)), None)
        hint = f"; did you mean {other!r}?" if other else f"; the fields are {sorted(fields)}"
        raise InvalidRequestError(f"LocalLLMKit has no field {name!r}{hint}", param=name)


def _user(prompt: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=prompt)


def _tool_choice(tool_choice: str | dict[str, Any] | None, tool_required: bool,
                 names: list[str]) -> str | dict[str, Any]:
    """OpenAI's tool_choice from LlamaIndex's: a mode, a tool's name, or an OpenAI dict."""
    if tool_choice is None:
        return "required" if tool_required else "auto"
    if isinstance(tool_choice, dict):
        return tool_choice  # create() validates it against the tools
    if not isinstance(tool_choice, str):
        raise InvalidRequestError(f"tool_choice must be a mode, a tool name or a dict, got {tool_choice!r}",
                                  param="tool_choice")
    if tool_choice in _TOOL_CHOICES:
        if tool_required and tool_choice != "required":
            raise InvalidRequestError(f"tool_required=True contradicts tool_choice={tool_choice!r}",
                                      param="tool_choice")
        return tool_choice
    if tool_choice not in names:
        raise InvalidRequestError(f"tool_choice {tool_choice!r} names no tool; the tools are {names}",
                                  param="tool_choice")
    return {"type": "function", "function": {"name": tool_choice}}
