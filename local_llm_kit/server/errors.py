"""Errors as OpenAI's API sends them: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI's clients (and the frameworks built on them) read the status code and this body to
raise their own typed exceptions, so every failure the server sends goes through here.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from local_llm_kit.errors import GenerationTimeoutError, InvalidRequestError, TemplateError, TokenLimitError

__all__ = ["APIError", "error_body", "error_from_exception", "error_response"]


class APIError(Exception):
    """An error the server answers with; ``status`` is the HTTP status code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(error: APIError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_response(error: APIError) -> Response:
    return Response(json.dumps(error_body(error)), status_code=error.status, media_type="application/json",
                    headers=error.headers)


def error_from_exception(exc: Exception) -> APIError | None:
    """The answer for a library error that the request caused (None: not the caller's fault)."""
    if isinstance(exc, TokenLimitError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, GenerationTimeoutError):
        # The request's own ``timeout`` passed: not a server fault, and retrying would pay it again
        # (openai's client retries 408 and 5xx unless told otherwise by x-should-retry).
        return APIError(504, str(exc), type="timeout_error", param="timeout", code="timeout",
                        headers={"x-should-retry": "false"})
    if isinstance(exc, TemplateError):
        # The chat template rejected this conversation (e.g. roles out of order): bad input.
        return APIError(400, str(exc), param="messages", code="invalid_value")
    return None
