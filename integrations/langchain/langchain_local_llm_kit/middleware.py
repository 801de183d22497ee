"""``ConversationMemoryMiddleware``: local_llm_kit's token-exact memory policy for ``create_agent``.

LangChain 1.x keeps a conversation in the agent's state (persisted by a LangGraph checkpointer)
and shapes what the model sees in middleware. This middleware gives the model the conversation
trimmed the way ``LLMClient.enable_memory`` trims: the system message is kept, the oldest whole
*turns* go first (a turn runs from a user message to the next one, so a tool call always stays
with its result), and every count is the model's own (chat template and tools rendered,
tokenized by its tokenizer). The state, and so the checkpointer, keeps the full history.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage, SystemMessage

from langchain_local_llm_kit.chat_models import ChatLocalLLMKit
from local_llm_kit import TokenLimitError

__all__ = ["ConversationMemoryMiddleware", "TrimReport", "split_turns"]

logger = logging.getLogger(__name__)


def split_turns(messages: Sequence[BaseMessage]) -> tuple[list[BaseMessage], list[list[BaseMessage]]]:
    """Leading system messages, and the rest as turns that each start at a user message.

    The same rule as ``local_llm_kit.memory.split_turns``, on LangChain messages.
    """
    head = 0
    while head < len(messages) and isinstance(messages[head], SystemMessage):
        head += 1
    turns: list[list[BaseMessage]] = []
    for message in messages[head:]:
        if isinstance(message, HumanMessage) or not turns:
            turns.append([])
        turns[-1].append(message)
    return list(messages[:head]), turns


@dataclass(frozen=True)
class TrimReport:
    """What the middleware sent on its most recent model call."""

    prompt_tokens: int
    """The prompt's exact token count (system message, kept messages, tools, generation prompt)."""
    budget: int
    """The most the prompt was allowed: ``max_tokens``, and never more than the context leaves
    after the reply's ``max_tokens``."""
    kept_messages: int
    dropped_turns: int


class ConversationMemoryMiddleware(AgentMiddleware[AgentState[Any], Any, Any]):
    """Keep each model call within ``max_tokens`` prompt tokens by dropping the oldest whole turns.

    :param max_tokens: budget for the whole prompt, in the model's tokens (system message and
        tool definitions included). None: whatever the context leaves after the reply.
    :param model: the :class:`ChatLocalLLMKit` whose tokenizer and template count; by default the
        agent's model (which must then be a ``ChatLocalLLMKit``).

    The budget is never above the context minus the reply's ``max_tokens`` (or one token when
    the model has no ``max_tokens``), so a trimmed call never raises ``TokenLimitError`` unless
    the newest turn alone cannot fit; that error then surfaces unchanged.
    """

    def __init__(self, max_tokens: int | None = None, *, model: ChatLocalLLMKit | None = None) -> None:
        super().__init__()
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if model is not None and not isinstance(model, ChatLocalLLMKit):
            raise TypeError(f"model must be a ChatLocalLLMKit, got {type(model).__name__}")
        self.max_tokens = max_tokens
        self.model = model
        self._lock = threading.Lock()
        self._last: TrimReport | None = None

    @property
    def last(self) -> TrimReport | None:
        """The report of the most recent model call (None before the first)."""
        with self._lock:
            return self._last

    def _counter(self, request: ModelRequest[Any]) -> ChatLocalLLMKit:
        if self.model is not None:
            return self.model
        if isinstance(request.model, ChatLocalLLMKit):
            return request.model
        raise TypeError("ConversationMemoryMiddleware counts tokens with a ChatLocalLLMKit; the agent's model is "
                        f"a {type(request.model).__name__}: pass model=ChatLocalLLMKit(...)")

    def _budget(self, model: ChatLocalLLMKit, request: ModelRequest[Any]) -> int:
        context = model.sync_client.engine.n_ctx  # the loaded model's real window (counting loads it anyway)
        reply = request.model_settings.get("max_tokens") or model.max_tokens or 1
        room = context - reply
        return room if self.max_tokens is None else min(self.max_tokens, room)

    def _candidates(self, request: ModelRequest[Any]) -> tuple[list[BaseMessage], list[list[BaseMessage]]]:
        return split_turns(request.messages)

    def _fit(self, request: ModelRequest[Any], min_drop: int = 0) -> tuple[ModelRequest[Any], TrimReport]:
        """The request with the fewest oldest turns dropped (at least ``min_drop``) that fits the budget."""
        model = self._counter(request)
        budget = self._budget(model, request)
        head, turns = self._candidates(request)
        system = [request.system_message] if request.system_message is not None else []
        tools = list(request.tools) or None

        def kept(drop: int) -> list[BaseMessage]:
            return head + [m for turn in turns[drop:] for m in turn]

        def count(drop: int) -> int:
            return model.get_num_tokens_from_messages(system + kept(drop), tools=tools)

        # Counts fall as turns are dropped: binary search the fewest drops that fit, always keeping
        # the newest turn (without it there is nothing to answer).
        last = max(len(turns) - 1, 0)
        low, high = min(min_drop, last), last
        if count(low) > budget:
            while low < high:
                mid = (low + high) // 2
                if count(mid) <= budget:
                    high = mid
                else:
                    low = mid + 1
        messages = kept(low)
        report = TrimReport(prompt_tokens=count(low), budget=budget, kept_messages=len(messages), dropped_turns=low)
        if low:
            logger.info("memory: left out the %d oldest turns (%d messages) to stay within %d tokens", low,
                        len(request.messages) - len(messages), budget)
        return request.override(messages=cast(list[AnyMessage], messages)), report

    def _remember(self, report: TrimReport) -> None:
        with self._lock:
            self._last = report

    def wrap_model_call(self, request: ModelRequest[Any],
                        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]]) -> ModelResponse[Any] | AIMessage:
        trimmed, report = self._fit(request)
        while True:
            try:
                response = handler(trimmed)
            except TokenLimitError:
                # What the count cannot see (a structured-output instruction, a bound tool the agent
                # adds later) did not fit: one more turn goes, unless only the newest one is left.
                if report.dropped_turns >= len(self._candidates(request)[1]) - 1:
                    raise
                trimmed, report = self._fit(request, report.dropped_turns + 1)
                continue
            self._remember(report)
            return response

    async def awrap_model_call(
        self, request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any] | AIMessage:
        # Counting renders and tokenizes (and may load the model the first time): off the loop.
        trimmed, report = await asyncio.to_thread(self._fit, request)
        while True:
            try:
                response = await handler(trimmed)
            except TokenLimitError:
                if report.dropped_turns >= len(self._candidates(request)[1]) - 1:
                    raise
                trimmed, report = await asyncio.to_thread(self._fit, request, report.dropped_turns + 1)
                continue
            self._remember(report)
            return response
