"""Helpers of the reliability suite: checks of every outcome, RSS, private engines on the real model.

The real model is loaded once per session and shared (as clients of one model share it in an
application). Tests that damage a model on purpose (an interrupt inside a decode) get an engine
of their own, built with the same load options but not registered in the shared engine cache.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import openai.types.chat as oai

from local_llm_kit import LLMClient
from local_llm_kit.backends import create_backend
from local_llm_kit.engine import Engine
from local_llm_kit.errors import InvalidRequestError, TokenLimitError

MODEL = "smollm2-135m-instruct"
GREEDY_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY_TOKENS = 12


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux), else psutil."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


def check_response(response: Any) -> oai.ChatCompletion:
    """The response validates as openai-python's ChatCompletion; returns the parsed object."""
    return oai.ChatCompletion.model_validate_json(response.model_dump_json())


def check_chunks(chunks: list[Any]) -> list[oai.ChatCompletionChunk]:
    return [oai.ChatCompletionChunk.model_validate_json(c.model_dump_json()) for c in chunks]


def check_error(error: BaseException) -> str:
    """An error a caller can act on: InvalidRequestError (TokenLimitError included) naming a parameter.

    Returns the kind of outcome, for the tallies.
    """
    assert isinstance(error, InvalidRequestError), f"unexpected {type(error).__name__}: {error!r}"
    assert error.param, f"{type(error).__name__} without param: {error}"
    assert str(error), "an error without a message"
    if isinstance(error, TokenLimitError):
        assert error.param in ("messages", "max_tokens"), error.param
        return "TokenLimitError"
    return "InvalidRequestError"


def greedy_answer(client: LLMClient) -> str:
    reply = client.chat.completions.create(messages=GREEDY_QUESTION, temperature=0, max_tokens=GREEDY_TOKENS)
    return reply.choices[0].message.content or ""


def private_client(template: LLMClient) -> LLMClient:
    """A client on an engine of its own: same weights and load options as ``template``, a fresh KV cache."""
    client = LLMClient(MODEL, temperature=0, cache_dir=template.settings.cache_dir)
    resolved = template.resolved_model
    client._resolved = resolved
    client._engine = Engine(resolved, "llama.cpp", create_backend("llama.cpp", str(resolved.path), template.options))
    return client


