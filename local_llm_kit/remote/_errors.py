"""How a server's answer becomes a library error (OpenAI's, vLLM's, llama.cpp's and FastAPI's shapes).

400/422 raise :class:`InvalidRequestError` (:class:`ContextOverflow`, a :class:`TokenLimitError`,
when the server says the prompt does not fit), 413 too; 404 for the model
:class:`ModelNotFoundError`; everything else :class:`RemoteServerError` saying which.
"""

from __future__ import annotations

import json
import re
from typing import Any

from local_llm_kit.errors import (
    GenerationTimeoutError,
    InvalidRequestError,
    LocalLLMKitError,
    ModelNotFoundError,
    RemoteServerError,
    TokenLimitError,
)

__all__ = ["ContextOverflow", "Rejected", "RemoteServerError", "error_from_answer", "json_or_raise", "unreachable"]


class Rejected(InvalidRequestError):
    """The server answered 400: an :class:`InvalidRequestError` that also keeps the server's code."""

    def __init__(self, message: str, *, param: str | None, code: str | None) -> None:
        super().__init__(message, param=param)
        self.code = code


class ContextOverflow(TokenLimitError):
    """The server said the prompt (plus ``max_tokens``) does not fit its context.

    The numbers are read from the server's message where it gives them (ours, vLLM's and
    llama.cpp's do); a number the message does not give is 0.
    """

    def __init__(self, message: str, *, param: str | None) -> None:
        numbers = _overflow_numbers(message)
        super().__init__(message, prompt_tokens=numbers[0], max_tokens=numbers[1], context_length=numbers[2],
                         param=param or "messages")


_OVERFLOW_PATTERNS = (
    # local-llm-kit: "the prompt is P tokens plus max_tokens=M, which exceeds the context length of C tokens"
    (re.compile(r"prompt is (\d+) tokens(?: plus max_tokens=(\d+))?.*context length of (\d+)"), (1, 2, 3)),
    # vLLM: "maximum context length is C tokens. However, you requested T tokens (P in the messages, M in ...)"
    (re.compile(r"maximum context length is (\d+) tokens.*?\((\d+) in the messages, (\d+) in the completion"),
     (2, 3, 1)),
    # llama.cpp's server: "Requested tokens (P) exceed context window of C"
    (re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)"), (1, None, 2)),
)


def _overflow_numbers(message: str) -> tuple[int, int | None, int]:
    for pattern, (prompt, asked, context) in _OVERFLOW_PATTERNS:
        match = pattern.search(message)
        if match:
            max_tokens = match.group(asked) if asked is not None else None
            return int(match.group(prompt)), int(max_tokens) if max_tokens else None, int(match.group(context))
    return 0, None, 0


def _is_overflow(code: str | None, message: str) -> bool:
    text = message.lower()
    return code == "context_length_exceeded" or "context length" in text or "context window" in text


def unreachable(url: str, exc: Exception) -> RemoteServerError:
    return RemoteServerError(f"cannot connect to {url}: {exc} (is the server running, and is base_url right?)")


def json_or_raise(status: int, content: bytes, url: str, model: str | None) -> dict[str, Any]:
    """The JSON answer of a 200, or the error an unsuccessful answer means."""
    try:
        data = json.loads(content) if content else {}
    except ValueError:
        data = {"error": {"message": content[:500].decode(errors="replace")}}
    if status == 200 and isinstance(data, dict):
        return data
    raise error_from_answer(status, data, url, model)


def error_from_answer(status: int, data: Any, url: str, model: str | None) -> LocalLLMKitError:
    """The library error for a server's error answer (OpenAI's, vLLM's or FastAPI's body shapes)."""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):  # vLLM's older {"object": "error", "message": ...}, FastAPI's {"detail": ...}
        error = data if isinstance(data, dict) else {"message": str(data)}
    message = error.get("message") or error.get("detail") or json.dumps(data)[:500]
    if not isinstance(message, str):
        message = json.dumps(message)[:500]
    param = error.get("param") if isinstance(error.get("param"), str) else None
    code = error.get("code") if isinstance(error.get("code"), str) else None
    text = f"{url} answered {status}: {message}"
    if status in (400, 422):
        if _is_overflow(code, message):
            return ContextOverflow(text, param=param)
        return Rejected(text, param=param, code=code)
    if status == 413:
        return Rejected(text, param=param or "messages", code=code)
    if status == 404 and (code == "model_not_found" or param == "model" or (model and model in message)):
        return ModelNotFoundError(f"the server does not serve the model {model!r}: {text}")
    if status == 504 and code == "timeout":  # this library's server: the request's own timeout passed
        return GenerationTimeoutError(text)
    if status in (401, 403):
        return RemoteServerError(f"the server refused the API key ({status}); pass api_key= or set "
                                 f"LOCAL_LLM_KIT_API_KEY: {text}", status=status, code=code)
    if status == 404:
        return RemoteServerError(f"{text} (base_url should end in /v1)", status=status, code=code)
    return RemoteServerError(text, status=status, code=code)

