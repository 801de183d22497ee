"""Conversions between LlamaIndex's chat types and local_llm_kit's OpenAI-shaped dicts and responses.

LlamaIndex 0.14 carries tool calls as ``ToolCallBlock``s in ``ChatMessage.blocks``; older code
(and some integrations) put OpenAI-shaped ``tool_calls`` in ``additional_kwargs``. Both are read;
replies are always written as ``ToolCallBlock``s. Tool results are ``role="tool"`` messages whose
``additional_kwargs["tool_call_id"]`` names the call they answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    ContentBlock,
    LogProb,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json

from local_llm_kit import CompletionChunk, InvalidRequestError
from local_llm_kit import CompletionResponse as LLKCompletion

__all__ = [
    "StreamAccumulator",
    "chat_response_from_completion",
    "completion_from_chat",
    "message_from_openai",
    "to_openai_message",
    "to_openai_messages",
    "tool_selections",
]

# Roles local_llm_kit accepts; LlamaIndex's "chatbot" and "model" are other providers' names
# for the assistant, accepted as such.
_ROLES = {
    MessageRole.SYSTEM: "system", MessageRole.DEVELOPER: "developer", MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant", MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool", MessageRole.FUNCTION: "function",
}


def to_openai_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI-shaped dicts for ``messages``; the inputs are only read, never changed."""
    return [to_openai_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def to_openai_message(message: ChatMessage, where: str = "message") -> dict[str, Any]:
    role = _ROLES.get(message.role)
    if role is None:
        raise InvalidRequestError(f"{where}.role {message.role!r} is not supported", param=f"{where}.role")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolCallBlock):
            calls.append(_call_from_block(block, len(calls)))
        elif isinstance(block, CachePoint):
            continue  # a provider-side caching hint; the KV cache is reused here automatically
        else:
            # Images, audio, documents, thinking...: a text-only local model cannot take them.
            raise InvalidRequestError(
                f"{where} has a {type(block).__name__}, which local_llm_kit models cannot read (text only)",
                param=f"{where}.blocks")
    if not calls:
        legacy = message.additional_kwargs.get("tool_calls") or ()
        calls = [_call_from_legacy(call, i, where) for i, call in enumerate(legacy)]
    content: str | None = "\n".join(texts) if texts else None
    out: dict[str, Any] = {"role": role, "content": content if content or not calls else None}
    if out["content"] is None and not calls:
        out["content"] = ""
    if calls:
        if role != "assistant":
            raise InvalidRequestError(f"{where} has tool calls but role {role!r}", param=f"{where}.role")
        out["tool_calls"] = calls
    if role == "tool":
        tool_call_id = message.additional_kwargs.get("tool_call_id")
        if not isinstance(tool_call_id, str):
            raise InvalidRequestError(
                f"{where} is a tool result without additional_kwargs['tool_call_id'] naming the call it answers",
                param=f"{where}.tool_call_id")
        out["tool_call_id"] = tool_call_id
    name = message.additional_kwargs.get("name")
    if isinstance(name, str) and role in ("tool", "function", "user", "system"):
        out["name"] = name
    return out


def _call_from_block(block: ToolCallBlock, index: int) -> dict[str, Any]:
    kwargs = block.tool_kwargs
    arguments = kwargs if isinstance(kwargs, str) else json.dumps(kwargs, ensure_ascii=False)
    return {"id": block.tool_call_id or f"call_{index}", "type": "function",
            "function": {"name": block.tool_name, "arguments": arguments}}


def _call_from_legacy(call: Any, index: int, where: str) -> dict[str, Any]:
    raw = call.model_dump() if hasattr(call, "model_dump") else call
    if not isinstance(raw, Mapping) or not isinstance(raw.get("function"), Mapping):
        raise InvalidRequestError(f"{where}.additional_kwargs['tool_calls'][{index}] is not an OpenAI tool call",
                                  param=f"{where}.tool_calls")
    function = raw["function"]
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": str(raw.get("id") or f"call_{index}"), "type": "function",
            "function": {"name": function.get("name"), "arguments": arguments}}


def _arguments(arguments: str) -> dict[str, Any] | str:
    """Parsed arguments when complete; the raw text while a streamed call is still being written."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    return value if isinstance(value, dict) else arguments


def message_from_openai(message: Mapping[str, Any]) -> ChatMessage:
    """A LlamaIndex ``ChatMessage`` from an OpenAI-shaped message dict (a reply or a remembered message)."""
    blocks: list[ContentBlock] = []
    calls = message.get("tool_calls") or []
    content = message.get("content")
    if content or not calls:
        blocks.append(TextBlock(text=content or ""))
    for call in calls:
        blocks.append(ToolCallBlock(tool_call_id=call["id"], tool_name=call["function"]["name"],
                                    tool_kwargs=_arguments(call["function"]["arguments"])))
    additional: dict[str, Any] = {}
    if message.get("tool_call_id") is not None:
        additional["tool_call_id"] = message["tool_call_id"]
    if message.get("name") is not None:
        additional["name"] = message["name"]
    if message.get("function_call") is not None:
        additional["function_call"] = dict(message["function_call"])
    if message.get("schema_violations"):  # keywords checked after decoding that the reply breaks
        additional["schema_violations"] = list(message["schema_violations"])
    return ChatMessage(role=MessageRole(message.get("role", "assistant")), blocks=blocks,
                       additional_kwargs=additional)


def _usage(usage: Any) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def _logprobs(choice: Any) -> list[list[LogProb]] | None:
    if choice.logprobs is None or not choice.logprobs.content:
        return None
    return [[LogProb(token=top.token, logprob=top.logprob, bytes=top.bytes or [])
             for top in (token.top_logprobs or [token])] for token in choice.logprobs.content]


def chat_response_from_completion(response: LLKCompletion) -> ChatResponse:
    """Usage goes where LlamaIndex's token counters look: ``raw["usage"]`` and ``additional_kwargs``."""
    choice = response.choices[0]
    message = message_from_openai(choice.message.model_dump(exclude_none=True))
    return ChatResponse(message=message, raw=response.model_dump(), additional_kwargs=_usage(response.usage),
                        logprobs=_logprobs(choice))


def completion_from_chat(response: ChatResponse) -> CompletionResponse:
    return CompletionResponse(text=response.message.content or "", delta=response.delta, raw=response.raw,
                              additional_kwargs=dict(response.additional_kwargs), logprobs=response.logprobs)


class StreamAccumulator:
    """Turns streamed chunks into ``ChatResponse``s that each carry the message so far and the delta.

    ``FunctionAgent`` reads tool calls from every streamed response, so each one holds the calls
    made so far (arguments as text until they are complete JSON).
    """

    def __init__(self) -> None:
        self.text = ""
        self._calls: dict[int, dict[str, str]] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.logprobs: list[list[LogProb]] | None = None  # of the tokens so far, as chat() gives them
        self.schema_violations: list[str] = []  # on the reply's last delta, as chat() reports them

    def add(self, chunk: CompletionChunk) -> ChatResponse:
        delta_text = ""
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta_text = choice.delta.content or ""
            self.text += delta_text
            for call in choice.delta.tool_calls or ():
                entry = self._calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            self.finish_reason = choice.finish_reason or self.finish_reason
            self.schema_violations += choice.delta.schema_violations or ()
            logprobs = _logprobs(choice)
            if logprobs:
                self.logprobs = [*(self.logprobs or []), *logprobs]
        additional: dict[str, Any] = {}
        if chunk.usage is not None:
            self.usage = _usage(chunk.usage)
            additional = dict(self.usage)
        return ChatResponse(message=self.message(), delta=delta_text, raw=chunk.model_dump(),
                            additional_kwargs=additional, logprobs=self.logprobs)

    def message(self) -> ChatMessage:
        calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                 for _, c in sorted(self._calls.items())]
        return message_from_openai({"role": "assistant", "content": self.text, "tool_calls": calls,
                                    "schema_violations": self.schema_violations})


def tool_selections(response: ChatResponse, error_on_no_tool_call: bool) -> list[ToolSelection]:
    """The calls in a response: ``ToolCallBlock``s, or else the older ``additional_kwargs['tool_calls']``."""
    message = response.message
    selections: list[ToolSelection] = []
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if blocks:
        for block in blocks:
            selections.append(ToolSelection(tool_id=block.tool_call_id or "", tool_name=block.tool_name,
                                            tool_kwargs=_kwargs(block.tool_kwargs)))
    else:
        for i, call in enumerate(message.additional_kwargs.get("tool_calls") or ()):
            normalized = _call_from_legacy(call, i, "response.message")
            selections.append(ToolSelection(tool_id=normalized["id"], tool_name=normalized["function"]["name"],
                                            tool_kwargs=_kwargs(normalized["function"]["arguments"])))
    if not selections and error_on_no_tool_call:
        raise ValueError(f"Expected at least one tool call, got none; the reply was: {message.content!r}")
    return selections


def _kwargs(arguments: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        # Only a streamed call still being written is incomplete: show what is there so far.
        try:
            value = parse_partial_json(arguments)
        except (ValueError, TypeError):
            value = {}
    return value if isinstance(value, dict) else {}
