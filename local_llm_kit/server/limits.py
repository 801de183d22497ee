"""What one request may ask of the server; everything past a limit is refused, never trimmed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from local_llm_kit.server.errors import APIError

__all__ = ["ServerLimits"]


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body accepted (413 past it)."""
    max_messages: int = 1024
    """Most messages in one request."""
    max_tokens: int | None = None
    """Largest ``max_tokens`` a request may ask for (None: only the model's context bounds it)."""
    max_n: int = 4
    """Most choices (``n``) in one request."""
    max_queue: int = 32
    """Requests that may wait per model while it generates for another; 503 past it."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_messages", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be at least 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")

    def check(self, body: dict[str, Any]) -> None:
        """Raise 400 for a request over a limit. Types are checked later, by request validation."""
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > self.max_messages:
            raise APIError(400, f"at most {self.max_messages} messages are accepted, got {len(messages)}",
                           param="messages", code="too_many_messages")
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if self.max_tokens is not None and isinstance(value, int) and value > self.max_tokens:
                raise APIError(400, f"{name} may be at most {self.max_tokens} on this server, got {value}",
                               param=name, code="invalid_value")
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > self.max_n:
            raise APIError(400, f"n may be at most {self.max_n} on this server, got {n}", param="n",
                           code="invalid_value")
