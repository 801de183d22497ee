"""``chat.completions.parse()``: openai-python's helper for typed structured output, in-process.

``parse(response_format=City, ...)`` sends the class's JSON schema as a strict ``json_schema``
response format and returns a :class:`~local_llm_kit.types.ParsedCompletion` whose messages
carry ``parsed``, the reply as a ``City``; tool calls carry ``parsed_arguments`` for strict tools
(a tool made with openai's ``pydantic_function_tool`` gives its model). As in openai's client,
a reply cut by ``max_tokens`` raises :class:`~local_llm_kit.errors.LengthFinishReasonError`
and ``stream`` is not a parameter. Here decoding is constrained to the schema, so the JSON
always validates against it; pydantic's own checks beyond the schema (validators) still run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from local_llm_kit.errors import InvalidRequestError, LengthFinishReasonError
from local_llm_kit.types import CompletionResponse, ParsedCompletion

__all__ = ["parse_params", "parsed_completion"]


def parse_params(params: dict[str, Any]) -> tuple[dict[str, Any], type[BaseModel] | None]:
    """``create()``'s parameters for a ``parse()`` call, and the class to parse the content as."""
    if "stream" in params:
        raise InvalidRequestError("parse() does not stream; use create(stream=True) and parse the JSON yourself",
                                  param="stream")
    params = dict(params)
    response_format = params.get("response_format")
    if isinstance(response_format, type):
        if not issubclass(response_format, BaseModel):
            raise InvalidRequestError(f"response_format must be a pydantic model class or a dict, got the class "
                                      f"{response_format.__name__}", param="response_format")
        params["response_format"] = {"type": "json_schema", "json_schema": {
            "name": response_format.__name__, "schema": response_format.model_json_schema(), "strict": True}}
        return params, response_format
    return params, None


def parsed_completion(response: CompletionResponse, response_format: type[BaseModel] | None,
                      tools: Sequence[Any] | None) -> ParsedCompletion[Any]:
    """``response`` with each message's ``parsed`` and each strict tool call's ``parsed_arguments``."""
    parsed: ParsedCompletion[Any] = ParsedCompletion.model_validate(response.model_dump())
    models = _tool_models(tools)
    for choice in parsed.choices:
        if choice.finish_reason == "length":
            raise LengthFinishReasonError(
                f"the reply was cut by max_tokens after {response.usage.completion_tokens} tokens: its JSON was "
                "closed in time and parses, but may be incomplete; raise max_tokens, or call create() to accept "
                "it as it is", completion=response)
        message = choice.message
        if response_format is not None and message.content is not None and not message.tool_calls:
            message.parsed = response_format.model_validate_json(message.content)
        for call in message.tool_calls or ():
            name = call.function.name
            if name in models:
                model = models[name]
                call.function.parsed_arguments = (json.loads(call.function.arguments) if model is None
                                                  else model.model_validate_json(call.function.arguments))
    return parsed


def _tool_models(tools: Sequence[Any] | None) -> dict[str, type[BaseModel] | None]:
    """Strict tools by name, each with its pydantic model where it has one (None: parse to a dict)."""
    models: dict[str, type[BaseModel] | None] = {}
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not function.get("strict"):
            continue  # openai's client parses the arguments of strict tools only
        # openai's pydantic_function_tool() wraps the function in a PydanticFunctionTool, a dict that keeps its model
        model = getattr(function, "model", None) or getattr(tool, "model", None)
        models[str(function.get("name"))] = model if isinstance(model, type) and issubclass(model, BaseModel) else None
    return models
