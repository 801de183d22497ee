"""What the grammar enforces of a JSON Schema, and checking the rest on the finished output.

``strict`` has OpenAI's meaning:

* ``strict: true`` — every keyword of the schema is enforced by the grammar, or the request is
  rejected with :class:`~local_llm_kit.errors.InvalidRequestError` naming the keyword the engine
  cannot enforce (llguidance's own reason, e.g. ``Unimplemented keys: ["uniqueItems"]``).
* ``strict`` false or absent — everything the engine can enforce is enforced; keywords it cannot
  (``uniqueItems``, ``not``, ``dependencies``, formats it does not know, ``oneOf`` beyond what can
  be turned into ``anyOf``...) are left out of the grammar and checked on the finished output with
  the ``jsonschema`` package. A violation does not raise: it is reported on the reply, as
  ``message.schema_violations`` (a list of readable messages; absent when the reply conforms).

:func:`enforce` finds the enforceable part by compiling and relaxing exactly the keywords the
engine reports, so it follows whatever the installed llguidance supports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from local_llm_kit.errors import InvalidRequestError

__all__ = ["EnforcedSchema", "enforce", "strip_keyword"]

_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')
_UNKNOWN_FORMAT = re.compile(r"Unknown format: ([^\s,\"']+)")
_ONE_OF = "oneOf constraints are not supported"
# Relaxation rounds: each round removes what the engine reported; real schemas need one or two.
_MAX_ROUNDS = 8
MAX_REPORTED_VIOLATIONS = 10

# Where sub-schemas live (everything else in a schema object is data: names, enums, defaults).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_VALUES = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
                  "additionalProperties", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")


@dataclass(frozen=True)
class EnforcedSchema:
    """A schema split into what the grammar enforces and what is checked afterwards."""

    schema: Any
    """The schema as the caller wrote it (the reference for checking)."""
    grammar_schema: Any
    """What the grammar is built from: ``schema`` minus the keywords in ``unenforced``."""
    unenforced: tuple[str, ...] = ()
    """Keywords (``uniqueItems``, ``format: path``...) the grammar does not enforce."""
    _formats: tuple[str, ...] = field(default=(), repr=False)

    def violations(self, text: str) -> list[str]:
        """What is wrong with the finished output ``text`` (empty when it conforms)."""
        if not self.unenforced:
            return []  # the grammar guarantees everything
        try:
            value = json.loads(text)
        except ValueError as exc:  # cannot happen for grammar output; reported rather than hidden
            return [f"not JSON: {exc}"]
        import jsonschema  # imported on first use: only non-strict schemas with unenforced keywords need it

        try:
            validator_class = jsonschema.validators.validator_for(self.schema)
            validator_class.check_schema(self.schema)
            known = [f for f in self._formats if f in jsonschema.FormatChecker.checkers]
            checker = jsonschema.FormatChecker(formats=known) if known else None
            validator = validator_class(self.schema, format_checker=checker)
            errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        except jsonschema.SchemaError as exc:
            return [f"the schema itself is invalid, so {', '.join(self.unenforced)} could not be checked: "
                    f"{exc.message}"]
        except jsonschema.exceptions.UnknownType as exc:
            return [f"the schema could not be checked: {exc}"]
        result = []
        for error in errors[:MAX_REPORTED_VIOLATIONS]:
            where = "/" + "/".join(str(p) for p in error.absolute_path)
            result.append(f"{where}: {error.message} ({error.validator})")
        return result


def strip_keyword(schema: Any, keyword: str, value: Any = None) -> Any:
    """``schema`` without ``keyword`` in any of its (sub-)schemas; with ``value``, only where it has it."""
    if not isinstance(schema, Mapping):
        return schema
    result: dict[str, Any] = {}
    for key, item in schema.items():
        if key == keyword and (value is None or item == value):
            continue
        if key in _SCHEMA_MAPS and isinstance(item, Mapping):
            result[key] = {name: strip_keyword(sub, keyword, value) for name, sub in item.items()}
        elif key in _SCHEMA_LISTS and isinstance(item, list):
            result[key] = [strip_keyword(sub, keyword, value) for sub in item]
        elif key in _SCHEMA_VALUES and isinstance(item, Mapping):
            result[key] = strip_keyword(item, keyword, value)
        else:
            result[key] = item
    return result


def enforce(schema: Any, *, strict: bool, compile_error: Callable[[Any], str | None], param: str) -> EnforcedSchema:
    """Split ``schema`` for the grammar; ``compile_error(s)`` returns the engine's reason or None.

    Strict schemas are enforced whole or rejected (:class:`InvalidRequestError` naming ``param``
    and the engine's reason); others are relaxed keyword by keyword until they compile.
    """
    error = compile_error(schema)
    if error is None:
        return EnforcedSchema(schema, schema)
    if strict:
        raise InvalidRequestError(f"{param} cannot be enforced (strict): {error}", param=param)
    relaxed = schema
    unenforced: list[str] = []
    formats: list[str] = []
    for _ in range(_MAX_ROUNDS):
        progress = False
        keys = _UNIMPLEMENTED.search(error)
        if keys:
            for key in re.findall(r'"([^"]+)"', keys.group(1)):
                relaxed = strip_keyword(relaxed, key)
                unenforced.append(key)
                progress = True
        unknown = _UNKNOWN_FORMAT.search(error)
        if unknown:
            name = unknown.group(1)
            relaxed = strip_keyword(relaxed, "format", name)
            unenforced.append(f"format: {name}")
            formats.append(name)
            progress = True
        if _ONE_OF in error and isinstance(relaxed, Mapping) and not _coerces_one_of(relaxed):
            # oneOf becomes anyOf in the grammar; exclusivity is checked on the output.
            relaxed = {**relaxed, "x-guidance": {**dict(relaxed.get("x-guidance") or {}), "coerce_one_of": True}}
            unenforced.append("oneOf")
            progress = True
        if not progress:
            break
        error = compile_error(relaxed)
        if error is None:
            return EnforcedSchema(schema, relaxed, tuple(dict.fromkeys(unenforced)), tuple(formats))
    raise InvalidRequestError(f"{param} cannot be enforced: {error}", param=param)


def _coerces_one_of(schema: Mapping[str, Any]) -> bool:
    options = schema.get("x-guidance")
    return isinstance(options, Mapping) and bool(options.get("coerce_one_of"))
