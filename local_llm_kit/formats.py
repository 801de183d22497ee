"""Validation of ``response_format`` into a typed :class:`JsonSpec` (done once, in request validation)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from local_llm_kit.errors import InvalidRequestError

__all__ = ["MAX_SCHEMA_PROMPT_CHARS", "NAME_RE", "JsonSpec", "parse_response_format"]

NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
"""Names of schemas and functions, as OpenAI allows them."""

MAX_SCHEMA_PROMPT_CHARS = 3000
"""Longer schemas are enforced but not repeated in the prompt (they would crowd a small context)."""


@dataclass(frozen=True)
class JsonSpec:
    """A validated JSON ``response_format``."""

    schema: dict[str, Any]
    name: str | None = None
    description: str | None = None
    any_object: bool = False
    """True for ``{"type": "json_object"}`` without a schema."""
    strict: bool = False
    """``json_schema.strict``: enforce every keyword or reject the schema (see :mod:`local_llm_kit.schemas`)."""

    def instruction(self) -> str:
        """The system-prompt note asking for JSON (small models write better values when told)."""
        if self.any_object:
            return "Respond only with a JSON object."
        text = json.dumps(self.schema, ensure_ascii=False, separators=(",", ":"))
        about = f" ({self.name}{': ' + self.description if self.description else ''})" if self.name else ""
        if len(text) > MAX_SCHEMA_PROMPT_CHARS:
            return f"Respond only with JSON{about}."
        return f"Respond only with JSON{about} that matches this JSON Schema:\n{text}"


def _keys(value: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidRequestError(f"{where} has unsupported keys {unknown} (allowed: {sorted(allowed)})",
                                  param="response_format")


def parse_response_format(value: Any) -> JsonSpec | None:
    """Validate ``response_format``; None means free text."""
    if value is None:
        return None
    if hasattr(value, "model_dump"):  # pydantic models (openai's)
        value = value.model_dump(exclude_none=True, by_alias=True)
    if not isinstance(value, Mapping):
        raise InvalidRequestError("response_format must be a dict", param="response_format")
    kind = value.get("type")
    if kind == "text":
        _keys(value, {"type"}, "response_format")
        return None
    if kind == "json_object":  # "schema" is llama-cpp-python's extension
        _keys(value, {"type", "schema"}, "response_format")
        schema = value.get("schema")
        if schema is None:
            return JsonSpec({"type": "object"}, any_object=True)
        return JsonSpec(_schema(schema, "response_format.schema"))
    if kind == "json_schema":
        _keys(value, {"type", "json_schema"}, "response_format")
        spec: Any = value.get("json_schema")
        if hasattr(spec, "model_dump"):
            spec = spec.model_dump(exclude_none=True, by_alias=True)
        if not isinstance(spec, Mapping):
            raise InvalidRequestError("response_format.json_schema must be an object",
                                      param="response_format")
        _keys(spec, {"name", "schema", "strict", "description"}, "response_format.json_schema")
        name = spec.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidRequestError(
                "response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'",
                param="response_format")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequestError("response_format.json_schema.strict must be a boolean",
                                      param="response_format")
        description = spec.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError("response_format.json_schema.description must be a string",
                                      param="response_format")
        schema = spec.get("schema")
        if schema is None:
            return JsonSpec({"type": "object"}, name, description, any_object=True, strict=bool(strict))
        return JsonSpec(_schema(schema, "response_format.json_schema.schema"), name, description,
                        strict=bool(strict))
    raise InvalidRequestError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        param="response_format")


def _schema(schema: Any, where: str) -> dict[str, Any]:
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"{where} must be a JSON Schema object", param="response_format")
    try:
        return dict(json.loads(json.dumps(schema)))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{where} is not JSON-serialisable: {exc}",
                                  param="response_format") from exc
