"""LlamaIndex integration for local_llm_kit: local models as function-calling LLMs, offline.

>>> from llama_index.llms.local_llm_kit import LocalLLMKit, LocalLLMKitMemory
>>> llm = LocalLLMKit(temperature=0)                       # the embedded SmolLM2, llama.cpp
>>> memory = LocalLLMKitMemory.from_defaults(llm=llm, token_limit=1000)
"""

from llama_index.llms.local_llm_kit._structured import StructuredOutputError
from llama_index.llms.local_llm_kit.base import LocalLLMKit
from llama_index.llms.local_llm_kit.memory import LocalLLMKitMemory

__all__ = ["LocalLLMKit", "LocalLLMKitMemory", "StructuredOutputError"]
