"""The parameters of ``chat.completions.create()``, declared once, typed for mypy and editors.

``create()`` (sync and async) and ``count_tokens()`` take them as ``**params:
Unpack[CompletionCreateParams]``, the way openai-python declares its ``CompletionCreateParams``:
a misspelled name or a wrong type is a type error in the caller's editor, and at run time an
:class:`~local_llm_kit.errors.InvalidRequestError` naming it. ``stream`` is not in the dict: it
selects the return type through ``@overload``.

What each parameter means for a local model is in the README ("Parameters"): every name is either
honoured or rejected by name; nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeAlias, TypedDict

from pydantic import BaseModel
from typing_extensions import NotRequired, Required

__all__ = ["PROMPT_SHAPING_PARAMETERS", "CompletionCreateParams", "MessageParam", "RequestOptions", "ToolChoiceParam"]

PROMPT_SHAPING_PARAMETERS = ("tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format")
"""Parameters beside ``messages`` and ``tools`` that change the prompt (a forced call, a schema's
instruction), so a token count must apply them (``count_tokens``, ``POST /tokenize``)."""

MessageParam: TypeAlias = Mapping[str, Any] | BaseModel
"""A message as a dict in OpenAI's shape (``{"role": ..., "content": ...}``), or a pydantic model
of one (our :class:`~local_llm_kit.types.Message`, openai's ``ChatCompletionMessage``)."""

ToolChoiceParam: TypeAlias = Literal["none", "auto", "required"] | Mapping[str, Any]
FunctionCallParam: TypeAlias = Literal["none", "auto"] | Mapping[str, Any]


class RequestOptions(TypedDict, total=False):
    """Keyword arguments of ``create()`` other than ``stream``, ``messages`` and ``tools``
    (what ``count_tokens()`` takes beside those)."""

    model: str | None
    temperature: float | None
    top_p: float | None
    max_tokens: int | None
    max_completion_tokens: int | None
    stream_options: Mapping[str, Any] | None
    stop: str | Sequence[str] | None
    seed: int | None
    n: int | None
    presence_penalty: float | None
    frequency_penalty: float | None
    logit_bias: Mapping[str | int, float] | None
    logprobs: bool | None
    top_logprobs: int | None
    response_format: Mapping[str, Any] | None
    tool_choice: ToolChoiceParam | None
    parallel_tool_calls: bool | None
    functions: Sequence[Mapping[str, Any]] | None
    function_call: FunctionCallParam | None
    user: str | None
    """An end-user identifier: written to the request log (logger ``local_llm_kit.requests``)."""
    timeout: float | None
    """Seconds the whole request may take, waiting for the model included; past it generation stops
    before the next token and :class:`~local_llm_kit.errors.GenerationTimeoutError` is raised."""
    extra_body: Mapping[str, Any] | None
    """More parameters, merged in as if passed by name (openai-python's escape hatch)."""
    extra_headers: Mapping[str, str] | None
    """Only meaningful over HTTP (``backend="openai"``); a non-empty value in-process raises."""
    extra_query: Mapping[str, Any] | None
    """Only meaningful over HTTP (``backend="openai"``); a non-empty value in-process raises."""
    store: Literal[False] | None
    """``False`` (nothing is stored, the only behaviour of a local model) or omitted."""
    metadata: NotRequired[None]
    """Only meaningful with ``store=True``; any value but ``None`` raises."""
    repetition_guard: bool | int | None
    """Not OpenAI's: in JSON or tool-call output, close the structure early once the reply repeats one
    sequence of tokens this many times in a row (``True``: 4; off by default). See the README,
    "Structured output"."""
    prompt_lookup: bool | int | None
    """Not OpenAI's: prompt-lookup speculative decoding for this request (``True``, ``False``, or the
    longest draft per forward pass); None takes the client's setting. The output is the same either
    way; only the speed changes (see the README, "Speculative decoding")."""


class CompletionCreateParams(RequestOptions, total=False):
    """Keyword arguments of ``create()`` other than ``stream``."""

    messages: Required[Iterable[MessageParam]]
    tools: Sequence[Mapping[str, Any]] | None
