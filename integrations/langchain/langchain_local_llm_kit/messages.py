"""Conversions between LangChain messages and local_llm_kit's OpenAI-shaped messages.

LangChain -> OpenAI goes through LangChain's own :func:`convert_to_openai_messages` (it already
understands OpenAI, Anthropic and standard content blocks, tool calls and tool results); the
result is then checked by the client, which rejects what a local model cannot take (images,
audio) with an :class:`~local_llm_kit.InvalidRequestError` naming the part.

OpenAI -> LangChain is written here, because it must keep what the client remembers exactly:
tool-call ids, the raw argument JSON of calls that did not parse, message names.

The client's conversation memory (``client.memory``, ``save_memory`` files) is plain OpenAI
messages, so the same two functions bridge it: :func:`messages_from_memory`,
:func:`load_memory_file`, :func:`add_to_memory` and :func:`save_memory_file`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages import convert_to_openai_messages as _lc_to_openai
from langchain_core.messages.tool import ToolCall, invalid_tool_call, tool_call

from local_llm_kit import LLMClient, Message
from local_llm_kit.memory import ConversationMemory
from local_llm_kit.request import normalize_messages

__all__ = [
    "add_to_memory",
    "ai_message_from_openai",
    "from_openai_messages",
    "load_memory_file",
    "messages_from_memory",
    "save_memory_file",
    "to_openai_messages",
]

logger = logging.getLogger(__name__)

# Keys LangChain may add that OpenAI's chat API (and so the client) does not take: message ids
# are LangChain bookkeeping, not model input.
_DROP_KEYS = ("id",)
# An earlier assistant turn's own reasoning blocks (Anthropic "thinking", OpenAI "reasoning") are
# left out of the history, as langchain-openai leaves them out of Chat Completions requests and as
# reasoning models' chat templates strip past reasoning; the turn's text and tool calls stay.
_PAST_REASONING = frozenset({"thinking", "redacted_thinking", "reasoning", "reasoning_content"})


def _without_past_reasoning(message: BaseMessage | Mapping[str, Any]) -> BaseMessage | Mapping[str, Any]:
    if isinstance(message, AIMessage) and isinstance(message.content, list):
        kept = [b for b in message.content if not (isinstance(b, dict) and b.get("type") in _PAST_REASONING)]
        if len(kept) != len(message.content):
            return message.model_copy(update={"content": kept})
    return message


def to_openai_messages(messages: Sequence[BaseMessage | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """LangChain messages (or message-likes) as OpenAI chat message dicts, ready for ``create()``.

    Content other than text (images, audio, files) is kept, so that the client rejects it with an
    error naming the part; earlier assistant turns' reasoning blocks are left out.
    """
    converted = _lc_to_openai([_without_past_reasoning(m) for m in messages], text_format="string")
    result: list[dict[str, Any]] = []
    for message in converted:
        out = {k: v for k, v in message.items() if k not in _DROP_KEYS}
        if out.get("role") == "assistant" and out.get("tool_calls") and not out.get("content"):
            # An assistant turn that only calls tools: OpenAI sends content None (or "").
            out["content"] = None
        result.append(out)
    return result


def _tool_calls(raw: Sequence[Mapping[str, Any]]) -> tuple[list[ToolCall], list[Any]]:
    calls: list[ToolCall] = []
    invalid: list[Any] = []
    for item in raw:
        function = item.get("function") or {}
        name = function.get("name")
        arguments = function.get("arguments") or ""
        call_id = item.get("id")
        try:
            args = json.loads(arguments) if arguments else {}
        except json.JSONDecodeError as exc:
            invalid.append(invalid_tool_call(name=name, args=arguments, id=call_id, error=str(exc)))
            continue
        if not isinstance(args, dict):
            invalid.append(invalid_tool_call(name=name, args=arguments, id=call_id,
                                             error="arguments are not a JSON object"))
            continue
        calls.append(tool_call(name=name or "", args=args, id=call_id))
    return calls, invalid


def ai_message_from_openai(message: Message | Mapping[str, Any]) -> AIMessage:
    """An assistant message (a response's ``choices[i].message`` or a dict) as an :class:`AIMessage`."""
    data = message.model_dump(exclude_none=True) if isinstance(message, Message) else dict(message)
    calls, invalid = _tool_calls(data.get("tool_calls") or ())
    additional: dict[str, Any] = {}
    if data.get("function_call"):
        additional["function_call"] = dict(data["function_call"])
    if data.get("refusal"):
        additional["refusal"] = data["refusal"]
    kwargs: dict[str, Any] = {}
    if data.get("name"):
        kwargs["name"] = data["name"]
    return AIMessage(content=data.get("content") or "", tool_calls=calls, invalid_tool_calls=invalid,
                     additional_kwargs=additional, **kwargs)


def from_openai_messages(messages: Sequence[Mapping[str, Any]]) -> list[BaseMessage]:
    """OpenAI chat message dicts (as ``client.memory`` holds them) as LangChain messages."""
    result: list[BaseMessage] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        name = message.get("name")
        extra: dict[str, Any] = {"name": name} if name else {}
        if role in ("system", "developer"):
            result.append(SystemMessage(content=content or "", **extra))
        elif role == "user":
            result.append(HumanMessage(content=content or "", **extra))
        elif role == "assistant":
            result.append(ai_message_from_openai(message))
        elif role == "tool":
            result.append(ToolMessage(content=content or "", tool_call_id=str(message.get("tool_call_id")),
                                      **extra))
        elif role == "function":
            result.append(FunctionMessage(content=content or "", name=str(name)))
        else:
            raise ValueError(f"messages[{i}].role {role!r} has no LangChain message type")
    return result


def messages_from_memory(client: LLMClient) -> list[BaseMessage]:
    """What ``client`` remembers (``client.memory``), as LangChain messages."""
    return from_openai_messages(client.memory)


def add_to_memory(client: LLMClient, messages: Sequence[BaseMessage]) -> None:
    """Make ``client`` remember LangChain ``messages`` (memory must be enabled; trimmed to its budget)."""
    client.add_to_memory(to_openai_messages(messages))


def load_memory_file(path: str | os.PathLike[str]) -> list[BaseMessage]:
    """The messages of a ``client.save_memory()`` file, as LangChain messages (no model is loaded)."""
    _, raw = ConversationMemory.read(path)
    return from_openai_messages(normalize_messages(raw, param="memory"))


def save_memory_file(messages: Sequence[BaseMessage], path: str | os.PathLike[str], *,
                     max_tokens: int = 1000) -> None:
    """Write LangChain ``messages`` as a memory file that ``client.load_memory(path)`` reads.

    ``max_tokens`` is the budget recorded in the file; the client trims to it when loading, with
    its own exact counts, so nothing is counted (or loaded) here.
    """
    memory = ConversationMemory(max_tokens, lambda _: 0)
    memory.replace(normalize_messages(to_openai_messages(messages)))
    memory.save(path)
