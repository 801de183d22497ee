"""Response and chunk models, shaped exactly like OpenAI's chat completion objects.

The JSON of :class:`CompletionResponse` is accepted by ``openai.types.chat.ChatCompletion``
and that of :class:`CompletionChunk` by ``openai.types.chat.ChatCompletionChunk``; the names
``CompletionResponse``, ``Choice``, ``Message`` and ``Usage`` are the ones the API reference
promises.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

__all__ = [
    "ChoiceLogprobs",
    "Choice",
    "ChunkChoice",
    "CompletionChunk",
    "CompletionResponse",
    "Delta",
    "FunctionCall",
    "FunctionCallDelta",
    "Message",
    "ParsedChoice",
    "ParsedCompletion",
    "ParsedFunctionCall",
    "ParsedMessage",
    "ParsedToolCall",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "TopLogprob",
    "Usage",
]

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")

    def __getitem__(self, key: str) -> Any:
        # Lets code written against dict-shaped responses (response["choices"]) keep working.
        return getattr(self, key)


class FunctionCall(_Model):
    """A call the model made: ``arguments`` is a JSON string, as OpenAI sends it."""

    name: str
    arguments: str


class ToolCall(_Model):
    """A tool call in a reply (``message.tool_calls``); answer it with a ``tool`` message naming ``id``."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    """A chat message produced by the model."""

    role: Literal["assistant", "user", "system", "tool", "function", "developer"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    function_call: FunctionCall | None = None
    tool_calls: list[ToolCall] | None = None
    schema_violations: list[str] | None = None
    """Set when a non-strict schema's unenforced keywords (``uniqueItems``...) are broken by the reply."""


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Model):
    """Per-token log probabilities of a choice's content (``logprobs=True``; ``top_logprobs`` alternatives)."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class Choice(_Model):
    """One of a response's ``n`` replies: its message and why it ended (``finish_reason``)."""

    index: int
    message: Message
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class Usage(_Model):
    """Exact token counts: the rendered prompt and every token the model sampled."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(_Model):
    """What ``chat.completions.create()`` returns without ``stream``, as openai's ``ChatCompletion``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class _SparseDelta(_Model):
    """A piece of a streamed call, serialized as OpenAI sends it: only the fields this chunk sets.

    A continuation chunk is ``{"index": 0, "function": {"arguments": "..."}}``, without
    ``"id": null, "type": null``: openai-python's ``chat.completions.stream()`` helper merges
    ``type`` by replacing it, so an explicit null there breaks its accumulated tool call.
    """

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class FunctionCallDelta(_SparseDelta):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_SparseDelta):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class Delta(_Model):
    """What a chunk adds to a choice's message: text, pieces of tool calls, or the role at the start."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    function_call: FunctionCallDelta | None = None
    tool_calls: list[ToolCallDelta] | None = None
    schema_violations: list[str] | None = None
    """As ``Message.schema_violations``, on a delta of its own at the end of the reply."""


class ChunkChoice(_Model):
    """One choice's part of a streamed chunk; ``finish_reason`` is set on its last one."""

    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class CompletionChunk(_Model):
    """One item of a stream, as openai's ``ChatCompletionChunk``; with ``stream_options={"include_usage":
    True}`` the last has no choices and carries ``usage``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


ResponseT = TypeVar("ResponseT")


class ParsedFunctionCall(FunctionCall):
    parsed_arguments: Any = None
    """The arguments as an object: the tool's pydantic model (a tool made with openai's
    ``pydantic_function_tool``), or a dict for another ``strict`` tool (see ``parse()``)."""


class ParsedToolCall(ToolCall):
    function: ParsedFunctionCall


class ParsedMessage(Message, Generic[ResponseT]):
    """A :class:`Message` with ``parsed``: the content as the ``response_format`` class (``parse()``)."""

    parsed: ResponseT | None = None
    tool_calls: list[ParsedToolCall] | None = None  # type: ignore[assignment]


class ParsedChoice(Choice, Generic[ResponseT]):
    """A :class:`Choice` of ``parse()``, whose message carries ``parsed``."""

    message: ParsedMessage[ResponseT]


class ParsedCompletion(CompletionResponse, Generic[ResponseT]):
    """What ``chat.completions.parse()`` returns, as openai's ``ParsedChatCompletion``."""

    choices: list[ParsedChoice[ResponseT]]  # type: ignore[assignment]
