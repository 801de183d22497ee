"""Exceptions raised by local_llm_kit.

Every error the library raises on purpose derives from :class:`LocalLLMKitError`::

    LocalLLMKitError
    ├── ModelNotFoundError        no weights where the model name points (says what was searched)
    ├── ModelLoadError            weights found but unusable (truncated, wrong format)
    ├── BackendNotAvailableError  the chosen backend's engine is not installed
    ├── InvalidRequestError       a parameter is malformed or unsupported (``.param`` names it)
    │   └── TokenLimitError       the prompt plus ``max_tokens`` does not fit the context
    ├── TemplateError             the model has no usable chat template
    ├── LengthFinishReasonError   parse(): the reply was cut by max_tokens, so it is no whole object
    ├── GenerationCancelledError  a stream was closed or a task cancelled mid-generation
    │   └── GenerationTimeoutError  the request's ``timeout`` passed (also a TimeoutError)
    ├── ModelUnloadedError        the model was unloaded while a request waited for it or ran
    ├── ClientClosedError         the client was closed with close() or its ``with`` block
    └── RemoteServerError         backend="openai": the server was unreachable, refused the key, or failed

``InvalidRequestError`` also derives from :class:`ValueError`, so code that already catches
``ValueError`` for bad arguments keeps working.
"""

from __future__ import annotations

__all__ = [
    "BackendNotAvailableError",
    "ClientClosedError",
    "GenerationCancelledError",
    "GenerationTimeoutError",
    "InvalidRequestError",
    "LengthFinishReasonError",
    "LocalLLMKitError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelUnloadedError",
    "RemoteServerError",
    "TemplateError",
    "TokenLimitError",
]


class LocalLLMKitError(Exception):
    """Base class of every error local_llm_kit raises on purpose."""


class ModelNotFoundError(LocalLLMKitError, FileNotFoundError):
    """No model weights where the model name or path points.

    ``searched`` lists every location that was tried; the message says how to get the model.
    """

    def __init__(self, message: str, *, searched: list[str] | None = None) -> None:
        super().__init__(message)
        self.searched: list[str] = list(searched or [])


class ModelLoadError(LocalLLMKitError):
    """Weights were found but the engine could not load them."""


class BackendNotAvailableError(LocalLLMKitError, ImportError):
    """The requested backend's engine (llama-cpp-python, torch/transformers) is missing."""


class InvalidRequestError(LocalLLMKitError, ValueError):
    """A request or constructor parameter is malformed or not supported.

    ``param`` names the offending parameter (``messages[2].role``, ``response_format``...).
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TokenLimitError(InvalidRequestError):
    """The prompt, plus the tokens asked for, does not fit the model's context window."""

    def __init__(
        self,
        message: str,
        *,
        prompt_tokens: int,
        max_tokens: int | None,
        context_length: int,
        param: str | None = "messages",
    ) -> None:
        super().__init__(message, param=param)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length


class TemplateError(LocalLLMKitError):
    """The model has no chat template and no known fallback, or its template failed."""


class GenerationCancelledError(LocalLLMKitError):
    """Generation stopped because its stream was closed or its task was cancelled."""


class ModelUnloadedError(LocalLLMKitError):
    """The model was unloaded (``unload_all()``, or the last client using it closed) while a
    request waited for it or ran. Clients load it again on their next request."""


class ClientClosedError(LocalLLMKitError):
    """The client was closed; create a new one to send more requests."""


class GenerationTimeoutError(GenerationCancelledError, TimeoutError):
    """The request's ``timeout`` passed before it finished; generation stopped before its next token."""


class LengthFinishReasonError(LocalLLMKitError):
    """``chat.completions.parse()`` found a reply cut by ``max_tokens``: its JSON parses (the
    grammar closed it in time) but the object may be incomplete, so it is not returned as one,
    as openai's client raises its ``LengthFinishReasonError``. ``completion`` is the response."""

    def __init__(self, message: str, *, completion: object) -> None:
        super().__init__(message)
        self.completion = completion


class RemoteServerError(LocalLLMKitError):
    """``backend="openai"``: the server could not be reached, timed out, refused the key, or failed.

    ``status`` is the HTTP status it answered with (None when there was no answer); ``code`` is
    the ``error.code`` of its answer, when it gave one.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
