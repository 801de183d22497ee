"""local_llm_kit: OpenAI's chat completions API over local language models, in-process.

>>> from local_llm_kit import LLMClient
>>> client = LLMClient()                     # the embedded SmolLM2 135M Instruct
>>> reply = client.chat.completions.create(messages=[{"role": "user", "content": "Hello!"}])
"""

from __future__ import annotations

import logging

from local_llm_kit.client import AsyncLLMClient, LLMClient
from local_llm_kit.engine import unload_all
from local_llm_kit.errors import (
    BackendNotAvailableError,
    ClientClosedError,
    GenerationCancelledError,
    GenerationTimeoutError,
    InvalidRequestError,
    LengthFinishReasonError,
    LocalLLMKitError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnloadedError,
    RemoteServerError,
    TemplateError,
    TokenLimitError,
)
from local_llm_kit.models import PACKAGED_MODELS
from local_llm_kit.params import CompletionCreateParams, MessageParam
from local_llm_kit.streaming import AsyncStream, Stream
from local_llm_kit.types import (
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionChunk,
    CompletionResponse,
    Delta,
    FunctionCall,
    Message,
    ParsedChoice,
    ParsedCompletion,
    ParsedMessage,
    ToolCall,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "PACKAGED_MODELS",
    "AsyncLLMClient",
    "AsyncStream",
    "BackendNotAvailableError",
    "ClientClosedError",
    "CompletionCreateParams",
    "Choice",
    "ChoiceLogprobs",
    "ChunkChoice",
    "CompletionChunk",
    "CompletionResponse",
    "Delta",
    "FunctionCall",
    "GenerationCancelledError",
    "GenerationTimeoutError",
    "InvalidRequestError",
    "LLMClient",
    "LengthFinishReasonError",
    "LocalLLMKitError",
    "Message",
    "MessageParam",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelUnloadedError",
    "RemoteServerError",
    "ParsedChoice",
    "ParsedCompletion",
    "ParsedMessage",
    "Stream",
    "TemplateError",
    "TokenLimitError",
    "ToolCall",
    "Usage",
    "__version__",
    "unload_all",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
