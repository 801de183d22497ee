"""Conversation memory for LlamaIndex, kept in real model tokens by local_llm_kit's own policy.

:class:`LocalLLMKitMemory` is a LlamaIndex ``BaseMemory`` (usable as ``memory=`` of agents,
``SimpleChatEngine`` and ``CondensePlusContextChatEngine``) backed by local_llm_kit's
``ConversationMemory``: the budget is counted by rendering the model's chat template and
tokenizing it, the system message is always kept, and the oldest whole turns go first, so an
assistant's tool calls never lose their results.

For LlamaIndex's own ``Memory``, ``llm.tokenizer_fn`` counts with the model's tokenizer instead
of tiktoken: ``Memory.from_defaults(token_limit=..., tokenizer_fn=llm.tokenizer_fn)``.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.memory.types import BaseMemory
from llama_index.llms.local_llm_kit import _convert
from llama_index.llms.local_llm_kit.base import LocalLLMKit

from local_llm_kit import InvalidRequestError
from local_llm_kit.memory import ConversationMemory
from local_llm_kit.request import normalize_messages

__all__ = ["LocalLLMKitMemory"]

# The live history of each session in this process: a memory rebuilt from its dict (a workflow
# Context does that between two runs) continues the very history the user's object holds, as
# LlamaIndex's own Memory does through its store; the saved messages serve only where none is live.
_live_sessions: weakref.WeakValueDictionary[str, ConversationMemory] = weakref.WeakValueDictionary()


class LocalLLMKitMemory(BaseMemory):
    """Chat history within ``token_limit`` model tokens (chat template included), trimmed turn by turn."""

    token_limit: int = Field(gt=0, description="Budget of the remembered history, in real model tokens.")
    llm: LocalLLMKit = Field(exclude=True, description="The model whose tokenizer and template count the budget.")
    session_id: str = Field(default_factory=lambda: uuid.uuid4().hex,
                            description="Names this history: copies made by from_dict() in this process share it.")

    _memory: ConversationMemory = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        live = _live_sessions.get(self.session_id)
        if live is not None and live.max_tokens == self.token_limit:
            self._memory = live
            return
        client = self.llm.client
        self._memory = ConversationMemory(self.token_limit, lambda messages: client.count_tokens(messages))
        _live_sessions[self.session_id] = self._memory

    @classmethod
    def class_name(cls) -> str:
        return "LocalLLMKitMemory"

    @classmethod
    def from_defaults(cls, llm: LocalLLMKit | None = None, token_limit: int | None = None,
                      chat_history: list[ChatMessage] | None = None, session_id: str | None = None,
                      **kwargs: Any) -> LocalLLMKitMemory:
        """Memory for ``llm`` (default: ``Settings.llm``); the default budget leaves room for one reply."""
        _refuse_unexpected("from_defaults", kwargs)
        if llm is None:
            from llama_index.core import Settings

            llm = Settings.llm  # type: ignore[assignment]
        if not isinstance(llm, LocalLLMKit):
            raise InvalidRequestError(f"llm must be a LocalLLMKit (its tokenizer counts the budget), got "
                                      f"{type(llm).__name__}", param="llm")
        if token_limit is None:
            token_limit = llm.metadata.context_window - llm.metadata.num_output
        memory = cls(llm=llm, token_limit=token_limit, **({"session_id": session_id} if session_id else {}))
        if chat_history:
            memory.set(chat_history)
        return memory

    @property
    def tokenizer_fn(self) -> Callable[[str], list[int]]:
        """The model's tokenizer: chat engines count their system prompt with it (``initial_token_count``)."""
        return self.llm.tokenizer_fn

    def token_count(self) -> int:
        """Tokens of the remembered history as the model sees it (chat template rendered)."""
        count: int = self._memory.token_count()
        return count

    @property
    def trimmed_total(self) -> int:
        """Messages dropped by trimming so far."""
        trimmed: int = self._memory.trimmed_total
        return trimmed

    # -- serialization: a workflow Context saves its memory between two agent.run(ctx=ctx) ----
    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """The budget, the model's settings and the remembered messages, as JSON-ready data.

        A workflow ``Context`` stores its memory this way between runs (and in ``ctx.to_dict()``),
        then rebuilds it with :meth:`from_dict`; without the messages a reused context would come
        back with an empty history."""
        _refuse_unexpected("to_dict", kwargs)
        messages = [dict(m) for m in self._memory.messages]
        return {"class_name": self.class_name(), "token_limit": self.token_limit, "session_id": self.session_id,
                "llm": self.llm.to_dict(), "messages": messages}

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> LocalLLMKitMemory:
        """Rebuild what :meth:`to_dict` gave. In the process that saved it, while the original lives,
        the copy shares its history (what either remembers, both do); elsewhere it starts from the
        saved messages. The model is rebuilt from its settings (a client with the same settings
        shares the loaded engine, so nothing loads twice) unless ``llm=`` is given."""
        llm = kwargs.pop("llm", None)
        _refuse_unexpected("from_dict", kwargs)
        data = dict(data)
        data.pop("class_name", None)
        llm_settings = data.pop("llm", None)
        if llm is None and llm_settings is not None:
            llm = LocalLLMKit.from_dict(dict(llm_settings))
        messages = data.pop("messages", [])
        live = _live_sessions.get(data.get("session_id") or "")
        memory = cls.from_defaults(llm=llm, **data)
        if memory._memory is not live:
            memory._memory.replace(normalize_messages(messages, param="messages"))
        return memory

    # -- BaseMemory -----------------------------------------------------------------------
    def get(self, input: str | None = None, initial_token_count: int = 0, **kwargs: Any) -> list[ChatMessage]:
        """The history to send; with ``initial_token_count`` (a prompt sent with it), older turns are
        left out of this call until both fit the budget. The system message always stays."""
        _refuse_unexpected("get", kwargs)
        if initial_token_count > self.token_limit:
            raise InvalidRequestError(f"initial_token_count {initial_token_count} exceeds token_limit "
                                      f"{self.token_limit}", param="initial_token_count")
        candidates = list(self._memory.candidates())  # from the whole history to the most trimmed
        chosen = candidates[0]
        if initial_token_count:
            client = self.llm.client
            chosen = candidates[-1]
            for candidate in candidates:
                tokens = client.count_tokens(candidate) if candidate else 0
                if tokens + initial_token_count <= self.token_limit:
                    chosen = candidate
                    break
        return [_convert.message_from_openai(m) for m in chosen]

    def get_all(self) -> list[ChatMessage]:
        return [_convert.message_from_openai(m) for m in self._memory.messages]

    def put(self, message: ChatMessage) -> None:
        self.put_messages([message])

    def put_messages(self, messages: Sequence[ChatMessage]) -> None:
        self._memory.add(_normalized(messages))

    def set(self, messages: Sequence[ChatMessage]) -> None:
        self._memory.replace(_normalized(messages))

    def reset(self) -> None:
        self._memory.clear()


def _normalized(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    normalized: list[dict[str, Any]] = normalize_messages(_convert.to_openai_messages(messages))
    return normalized


def _refuse_unexpected(method: str, kwargs: dict[str, Any]) -> None:
    """LlamaIndex passes extra keywords through ``**kwargs``; one we do not take must not vanish."""
    if kwargs:
        name = sorted(kwargs)[0]
        raise InvalidRequestError(f"LocalLLMKitMemory.{method}() got an unexpected argument {name!r}", param=name)
