"""LangChain integration for local_llm_kit: local models as a LangChain chat model.

>>> from langchain_local_llm_kit import ChatLocalLLMKit
>>> model = ChatLocalLLMKit(temperature=0, max_tokens=64)   # the embedded SmolLM2 135M Instruct
>>> model.invoke("Say hello.").content
"""

from __future__ import annotations

import logging

from langchain_local_llm_kit.chat_models import ChatLocalLLMKit
from langchain_local_llm_kit.messages import (
    add_to_memory,
    ai_message_from_openai,
    from_openai_messages,
    load_memory_file,
    messages_from_memory,
    save_memory_file,
    to_openai_messages,
)
from langchain_local_llm_kit.middleware import ConversationMemoryMiddleware, TrimReport

__version__ = "0.1.0"

__all__ = [
    "ChatLocalLLMKit",
    "ConversationMemoryMiddleware",
    "TrimReport",
    "__version__",
    "add_to_memory",
    "ai_message_from_openai",
    "from_openai_messages",
    "load_memory_file",
    "messages_from_memory",
    "save_memory_file",
    "to_openai_messages",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
