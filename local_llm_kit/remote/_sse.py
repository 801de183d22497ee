"""Reading a streamed answer: server-sent events -> :class:`CompletionChunk`, and whole answers."""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import httpx
from pydantic import ValidationError

from local_llm_kit.remote._errors import RemoteServerError, error_from_answer
from local_llm_kit.types import CompletionChunk, CompletionResponse

__all__ = ["close_on_collect", "iter_chunks", "parse_completion"]


def iter_chunks(response: httpx.Response, cancel: threading.Event | None = None) -> Iterator[CompletionChunk]:
    """The chunks of a streaming answer, until ``data: [DONE]``; closes the response at the end.

    Closing the iterator (or setting ``cancel``) closes the connection: a server that watches its
    connections (vLLM, ours) stops generating.
    """
    try:
        for payload in _events(response.iter_lines()):
            if payload == "[DONE]":
                return
            yield _chunk(payload, str(response.url))
            if cancel is not None and cancel.is_set():
                return
        raise RemoteServerError(f"{response.url}: the stream ended without 'data: [DONE]' (connection lost?)")
    except httpx.HTTPError as exc:
        raise RemoteServerError(f"{response.url}: the stream broke off: {exc!r}") from exc
    finally:
        response.close()


def _events(lines: Iterator[str]) -> Iterator[str]:
    """The data payloads of a server-sent event stream."""
    data: list[str] = []
    for line in lines:
        yield from _feed(line, data)
    if data:
        yield "\n".join(data)


def _feed(line: str, data: list[str]) -> Iterator[str]:
    line = line.rstrip("\r")
    if not line:
        if data:
            yield "\n".join(data)
            data.clear()
    elif line.startswith("data:"):
        value = line[5:]
        data.append(value[1:] if value.startswith(" ") else value)
        # Servers put one JSON document per data line; dispatch at once rather than waiting
        # for the blank line, so a chunk is not held back by the server's buffering.
        if data[-1] == "[DONE]" or _complete_json(data[-1]):
            yield "\n".join(data)
            data.clear()
    # comments (":"), "event:", "id:" and "retry:" lines carry nothing for chat completions


def _complete_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _chunk(payload: str, url: str) -> CompletionChunk:
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise RemoteServerError(f"{url} sent an event that is not JSON: {payload[:200]!r}") from exc
    if isinstance(data, dict) and "error" in data:
        error = data["error"]
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) else 500
        raise error_from_answer(status, data, url, None)
    try:
        return CompletionChunk.model_validate(data)
    except ValidationError as exc:
        raise RemoteServerError(f"{url} sent a chunk that is not a chat completion chunk: {exc}") from exc


def parse_completion(data: dict[str, Any], url: str) -> CompletionResponse:
    try:
        return CompletionResponse.model_validate(data)
    except ValidationError as exc:
        raise RemoteServerError(f"{url} answered with something that is not a chat completion: {exc}") from exc


def close_on_collect(owner: object, response: httpx.Response) -> None:
    """Close ``response`` when ``owner`` (a stream never iterated to its end) is collected."""
    weakref.finalize(owner, response.close)


