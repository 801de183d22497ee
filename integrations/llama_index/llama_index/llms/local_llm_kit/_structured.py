"""Structured output through constrained JSON-schema decoding (not a prompt-and-parse program).

The grammar makes the model's text valid JSON for ``output_cls``'s schema token by token, so the
only way to get an invalid result is a reply cut short by ``max_tokens``: that raises, as does
any result pydantic rejects (a validator stricter than the schema). The error text is never
returned as if it were the answer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Any, TypeVar

from llama_index.core.base.llms.types import ChatMessage, ChatResponse
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictInProgressEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.llm import LLM
from llama_index.core.program.utils import FlexibleModel, process_streaming_objects
from llama_index.core.prompts import PromptTemplate
from llama_index_instrumentation import get_dispatcher
from pydantic import BaseModel, ValidationError

from local_llm_kit import InvalidRequestError

__all__ = ["Model", "StructuredOutputError", "astream", "finish", "response_format", "start", "stream"]

dispatcher = get_dispatcher(__name__)

Model = TypeVar("Model", bound=BaseModel)

# These would compete with the schema for what the model must produce.
_CONFLICTING = ("response_format", "tools", "tool_choice", "functions", "function_call")


class StructuredOutputError(ValueError):
    """The model's output is not a valid instance of the requested class (e.g. cut by ``max_tokens``)."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


def response_format(output_cls: type[Any]) -> dict[str, Any]:
    """The class's schema, not ``strict`` (llama-index's OpenAI LLM sends ``strict=False`` too): the
    grammar enforces every keyword it can, and pydantic validates the result in :func:`finish`.
    Strict would refuse common classes outright: a ``set[str]`` field's ``uniqueItems`` is not a
    grammar, yet pydantic accepts the JSON array either way."""
    return {"type": "json_schema",
            "json_schema": {"name": output_cls.__name__, "schema": output_cls.model_json_schema()}}


def start(llm: LLM, output_cls: type[Model], prompt: PromptTemplate, llm_kwargs: dict[str, Any] | None,
          prompt_args: dict[str, Any]) -> tuple[list[ChatMessage], dict[str, Any]]:
    dispatcher.event(LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args))
    kwargs = dict(llm_kwargs or {})
    for name in _CONFLICTING:
        if name in kwargs:
            raise InvalidRequestError(f"{name} cannot be combined with structured output: the schema of "
                                      f"{output_cls.__name__} decides the output", param=name)
    kwargs["response_format"] = response_format(output_cls)
    return llm._get_messages(prompt, **prompt_args), kwargs


def finish(output_cls: type[Model], response: ChatResponse) -> Model:
    text = response.message.content or ""
    raw = response.raw if isinstance(response.raw, dict) else {}
    choices = raw.get("choices") or [{}]
    if choices[0].get("finish_reason") == "length":
        raise StructuredOutputError(
            f"the {output_cls.__name__} JSON was cut short by max_tokens after {len(text)} characters; "
            "raise max_tokens", text)
    try:
        result = output_cls.model_validate_json(text)
    except ValidationError as exc:
        raise StructuredOutputError(f"the model's output is not a valid {output_cls.__name__}: {exc}", text) from exc
    dispatcher.event(LLMStructuredPredictEndEvent(output=result))
    return result


def _final_response(last: ChatResponse | None, finish_reason: str | None) -> ChatResponse:
    assert last is not None, "the stream produced no response"
    raw = {"choices": [{"finish_reason": finish_reason}]}
    return ChatResponse(message=last.message, raw=raw)


def _partial(output_cls: type[Model], response: ChatResponse,
             current: list[Any] | None) -> Model | FlexibleModel:
    obj = process_streaming_objects(response, output_cls, cur_objects=current, flexible_mode=True)
    assert not isinstance(obj, list)
    dispatcher.event(LLMStructuredPredictInProgressEvent(output=obj))
    return obj


def _finish_reason(response: ChatResponse, previous: str | None) -> str | None:
    raw = response.raw if isinstance(response.raw, dict) else {}
    for choice in raw.get("choices") or ():
        if choice.get("finish_reason"):
            return str(choice["finish_reason"])
    return previous


def stream(output_cls: type[Model], responses: Iterator[ChatResponse]) -> Generator[Model | FlexibleModel, None, None]:
    """Partial objects while the JSON grows, then the validated instance (or an error)."""
    last: ChatResponse | None = None
    reason: str | None = None
    current: list[Any] | None = None
    for response in responses:
        last, reason = response, _finish_reason(response, reason)
        if response.delta:
            obj = _partial(output_cls, response, current)
            current = [obj]
            yield obj
    yield finish(output_cls, _final_response(last, reason))


async def astream(output_cls: type[Model],
                  responses: AsyncIterator[ChatResponse]) -> AsyncGenerator[Model | FlexibleModel, None]:
    last: ChatResponse | None = None
    reason: str | None = None
    current: list[Any] | None = None
    async for response in responses:
        last, reason = response, _finish_reason(response, reason)
        if response.delta:
            obj = _partial(output_cls, response, current)
            current = [obj]
            yield obj
    yield finish(output_cls, _final_response(last, reason))
