"""How generated text becomes an assistant message, whole or as stream deltas.

An :class:`OutputMode` decides the prompt additions, the decoding constraint and the shaping
of the result. Plain text is the simplest mode; structured output (JSON, tool calls) provides
others through the same seam, so the request path has no special cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from local_llm_kit.decoding import Constraint
from local_llm_kit.types import Delta, FinishReason, Message

__all__ = ["OutputMode", "StreamShaper", "TextOutput"]


class StreamShaper(Protocol):
    """Turns generated text, as it arrives, into OpenAI-shaped deltas."""

    def feed(self, text: str) -> list[Delta]: ...

    def finish(self, reason: str) -> tuple[list[Delta], FinishReason]: ...


class OutputMode(Protocol):
    def prepare_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation as the template should render it (tool prompts added, etc.)."""
        ...

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """Tools handed to the chat template's ``tools`` variable, if any."""
        ...

    def constraint(self) -> Constraint | None:
        """A fresh constraint for one generation (None: unconstrained)."""
        ...

    def finalize(self, text: str, reason: str) -> tuple[Message, FinishReason]:
        """The whole generated text as the assistant's message."""
        ...

    def stream_shaper(self) -> StreamShaper: ...


class _TextShaper:
    def feed(self, text: str) -> list[Delta]:
        return [Delta(content=text)] if text else []

    def finish(self, reason: str) -> tuple[list[Delta], FinishReason]:
        return [], "length" if reason == "length" else "stop"


class TextOutput:
    """Free text: no constraint, the content is the generated text."""

    template_tools: list[dict[str, Any]] | None = None

    def prepare_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(messages)

    def constraint(self) -> Constraint | None:
        return None

    def finalize(self, text: str, reason: str) -> tuple[Message, FinishReason]:
        return Message(role="assistant", content=text), "length" if reason == "length" else "stop"

    def stream_shaper(self) -> StreamShaper:
        return _TextShaper()
