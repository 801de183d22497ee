"""The backend contract: the narrow waist between the request path and an inference engine.

A backend knows nothing of OpenAI shapes, tools, JSON, memory or streaming. It tokenizes,
turns token ids back into bytes, evaluates new tokens on top of the tokens already in its KV
cache and returns the logits of the last position, and trims that cache to a prefix. Everything
else (prefix reuse, sampling, constraints, stop strings) lives in the one decode loop in
:mod:`local_llm_kit.decoding`, so every backend behaves the same.

Backends are not thread-safe; the :class:`~local_llm_kit.engine.Engine` that owns one
serializes access with its lock.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import llguidance

__all__ = ["Backend", "ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    """What the layers above need to know about a loaded model."""

    path: str
    """The file or folder the weights came from."""
    architecture: str
    """Architecture name as the weights declare it (``llama``, ``gemma3``...)."""
    n_vocab: int
    """Number of logits the backend returns per position."""
    n_ctx_train: int
    """Context length the model was trained with."""
    eos_token_ids: frozenset[int]
    """Tokens that end a generation (end-of-sequence and end-of-turn)."""
    bos_token: str = ""
    eos_token: str = ""
    bos_token_id: int | None = None
    chat_template: str | None = None
    """The Jinja chat template shipped with the weights, if any."""
    extra: dict[str, str] = field(default_factory=dict)


class Backend(abc.ABC):
    """An inference engine holding one model and one KV cache."""

    name: str = "abstract"

    def __init__(self) -> None:
        self._cached: list[int] = []
        # Which generation last changed the cache; the decode loop re-evaluates its own tokens
        # when another one (an interleaved stream on the same thread) has been there since.
        self.owner: object | None = None

    # -- metadata ---------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """Static facts about the loaded model."""

    @property
    @abc.abstractmethod
    def n_ctx(self) -> int:
        """Context length in effect (prompt plus generated tokens must fit)."""

    # -- text <-> tokens ----------------------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Tokenize text, parsing special-token markup, without adding a BOS token.

        Chat templates write the BOS token themselves, exactly as transformers'
        ``apply_chat_template`` tokenizes with ``add_special_tokens=False``.
        """

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for in text (special tokens as their markup)."""

    @abc.abstractmethod
    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        """The model's vocabulary as llguidance sees it, for constrained decoding (cached)."""

    # -- evaluation --------------------------------------------------------------------------
    @property
    def cached_tokens(self) -> Sequence[int]:
        """Token ids whose keys and values are in the KV cache, in order."""
        return self._cached

    @abc.abstractmethod
    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate ``tokens`` after the cached ones; return the last position's logits.

        The result is a float32 vector of length ``info.n_vocab`` that the caller may modify;
        it may be a view of the engine's buffer, valid until the next call. Only the last
        position's logits are computed. On success ``cached_tokens`` grows by ``tokens``.
        """

    @abc.abstractmethod
    def truncate_cache(self, n_keep: int) -> int:
        """Drop cached tokens after the first ``n_keep``; return how many are really kept.

        An engine that cannot trim part of its cache (some sliding-window caches) may keep
        fewer tokens than asked, down to zero; the decode loop re-evaluates the rest.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources; the backend is unusable afterwards."""
