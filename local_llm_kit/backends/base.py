"""The backend contract: the narrow waist between the request path and an inference engine.

A backend knows nothing of OpenAI shapes, tools, JSON, memory or streaming. It tokenizes,
turns token ids back into bytes, evaluates new tokens on top of the tokens already in its KV
cache and returns the logits of the last position, and trims that cache to a prefix. Everything
else (prefix reuse, sampling, constraints, stop strings) lives in the one decode loop in
:mod:`local_llm_kit.decoding`, so every backend behaves the same.

Backends are not thread-safe; the :class:`~local_llm_kit.engine.Engine` that owns one
serializes access with its lock.

KV-cache slots. A backend may keep several cached sequences at once (``n_slots``), so that
conversations taking turns on one model do not evict each other's prefix. Exactly one slot is
*current*: ``cached_tokens``, ``forward`` and ``truncate_cache`` act on it, so a backend
implements them for one sequence and switches with :meth:`Backend.use_slot`. The decode loop
gets a :class:`SlotView`, a backend bound to one slot, chosen by the engine (see
:mod:`local_llm_kit.slots`), so a generation always works on its own slot whatever another
generation did in between.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, SupportsIndex

import numpy as np

if TYPE_CHECKING:
    import llguidance

__all__ = ["KV_BUDGET_BYTES", "MAX_DEFAULT_KV_SLOTS", "Backend", "ModelInfo", "SlotView", "default_kv_slots",
           "output_rows"]

KV_BUDGET_BYTES = 1 << 30
"""Memory the default number of KV-cache slots may take together (1 GiB)."""
MAX_DEFAULT_KV_SLOTS = 4
"""The most slots chosen by default (four conversations alternating on one model)."""


def default_kv_slots(kv_bytes_per_token: int | None, n_ctx: int) -> int:
    """Slots of ``n_ctx`` tokens that fit :data:`KV_BUDGET_BYTES`, from 1 to :data:`MAX_DEFAULT_KV_SLOTS`.

    SmolLM2 135M (23 KiB of f16 keys and values per token) and Gemma 3 270M (18 KiB) get 4 slots
    at 2,048 tokens (46 and 36 MiB each); an 8B Llama (128 KiB per token) at 8,192 tokens gets 1.
    An unknown KV size gets 1 slot.
    """
    if not kv_bytes_per_token or kv_bytes_per_token <= 0:
        return 1
    return max(1, min(MAX_DEFAULT_KV_SLOTS, KV_BUDGET_BYTES // (kv_bytes_per_token * max(1, n_ctx))))


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
    """An inference engine holding one model and ``n_slots`` cached sequences (one is current)."""

    name: str = "abstract"

    def __init__(self, n_slots: int = 1) -> None:
        self._allocate_slots(n_slots)

    def _allocate_slots(self, n_slots: int) -> None:
        if n_slots < 1:
            raise ValueError(f"a backend needs at least one KV-cache slot, not {n_slots}")
        self._slot_tokens: list[_SlotTokens] = [_SlotTokens() for _ in range(n_slots)]
        # Per slot: the logits after its first n cached tokens, as the pass that evaluated them gave them.
        self._slot_logits: list[tuple[int, np.ndarray] | None] = [None] * n_slots
        # Which generation last changed each slot; the decode loop re-evaluates its own tokens
        # when another one (an interleaved stream on the same thread) has been there since.
        self._slot_owners: list[object | None] = [None] * n_slots
        self._slot = 0

    # -- slots ---------------------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        """How many sequences the KV cache holds at once."""
        return len(self._slot_tokens)

    @property
    def slot(self) -> int:
        """The current slot (the one ``forward``, ``truncate_cache`` and ``cached_tokens`` use)."""
        return self._slot

    def slot_tokens(self, index: int) -> Sequence[int]:
        """Token ids cached in slot ``index``."""
        return self._slot_tokens[index]

    def use_slot(self, index: int) -> None:
        """Make slot ``index`` current."""
        if not 0 <= index < len(self._slot_tokens):
            raise IndexError(f"slot {index} does not exist (this backend has {len(self._slot_tokens)})")
        if index != self._slot:
            self._switch_slot(index)
            self._slot = index

    def _switch_slot(self, index: int) -> None:  # noqa: B027 - optional hook
        """Engine-specific work to make ``index`` current (called before ``slot`` changes)."""

    def clear_cache(self) -> None:
        """Empty every slot (the next prompt is evaluated cold); slot 0 becomes current."""
        for index in range(self.n_slots):
            self.use_slot(index)
            self.truncate_cache(0)
        self.use_slot(0)

    @property
    def _cached(self) -> _SlotTokens:
        """The current slot's token ids (backends extend and trim it as their cache changes)."""
        return self._slot_tokens[self._slot]

    def remember_logits(self, logits: np.ndarray) -> None:
        """Keep ``logits`` as those after every token now cached in the current slot (a copy)."""
        self._slot_logits[self._slot] = (len(self._cached), np.array(logits, dtype=np.float32, copy=True))
        self._cached.mark()

    def recall_logits(self, length: int) -> np.ndarray | None:
        """The logits after the current slot's first ``length`` tokens, as :meth:`remember_logits`
        kept them (a copy the caller may change); None unless those tokens have stayed cached
        since, untouched, so that the logits are still theirs.

        Why: a prompt evaluated again (a repeated request, a second choice of ``n``) would
        otherwise have its last token evaluated alone, and an engine's kernels round a position
        evaluated alone differently from one in a batch (llama.cpp on a CPU, transformers in
        bfloat16): a greedy near-tie could then go another way than it did the first time.
        """
        kept = self._slot_logits[self._slot]
        if kept is None or kept[0] != length or self._cached.lowest < length or len(self._cached) < length:
            return None
        return kept[1].copy()

    @property
    def owner(self) -> object | None:
        """The generation that last changed the current slot."""
        return self._slot_owners[self._slot]

    @owner.setter
    def owner(self, value: object | None) -> None:
        self._slot_owners[self._slot] = value

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
        """Token ids whose keys and values are in the current slot of the KV cache, in order."""
        return self._cached

    @abc.abstractmethod
    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate ``tokens`` after the current slot's cached ones; return the last position's logits.

        The result is a float32 vector of length ``info.n_vocab`` that the caller may modify;
        it may be a view of the engine's buffer, valid until the next call. Only the last
        position's logits are computed. On success ``cached_tokens`` grows by ``tokens``.
        """

    def forward_all(self, tokens: Sequence[int], rows: Sequence[int] | None = None) -> np.ndarray:
        """Like :meth:`forward`, but return the logits of the positions ``rows`` of ``tokens``
        (indices, ascending; every position when None).

        A float32 array of shape ``(len(rows), info.n_vocab)`` owned by the caller (not a view of
        an engine buffer: the decode loop keeps rows across steps). Its row ``i`` predicts the
        token after ``tokens[rows[i]]``. Logits are computed for those positions only where the
        engine allows: with a large vocabulary the output layer is much of a pass (Gemma 3's has
        262k entries), and a draft's positions where the grammar forces the next token need none.
        Speculative decoding verifies a draft with one such pass; an engine
        that cannot compute several positions at once leaves this unimplemented, and speculation
        is then refused for it (see :attr:`verifies_drafts`).
        """
        raise NotImplementedError(f"the {self.name} backend cannot return logits for several positions")

    @property
    def verifies_drafts(self) -> bool:
        """Whether :meth:`forward_all` is implemented (speculative decoding can run here)."""
        return type(self).forward_all is not Backend.forward_all

    @abc.abstractmethod
    def truncate_cache(self, n_keep: int) -> int:
        """Drop the current slot's cached tokens after the first ``n_keep``; return how many are kept.

        An engine that cannot trim part of its cache (some sliding-window caches) may keep
        fewer tokens than asked, down to zero; the decode loop re-evaluates the rest.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources; the backend is unusable afterwards."""


class SlotView(Backend):
    """A backend bound to one of its slots: what one generation's decode loop works on.

    Every call first makes the slot current, so interleaved generations on other slots (a
    borrowing stream, see :mod:`local_llm_kit.lease`) never touch this one's cache.
    """

    def __init__(self, backend: Backend, index: int) -> None:  # no super().__init__: no slots of its own
        if not 0 <= index < backend.n_slots:
            raise IndexError(f"slot {index} does not exist (the backend has {backend.n_slots})")
        self.backend = backend
        self.index = index
        self.name = backend.name

    @property
    def n_slots(self) -> int:
        return 1

    @property
    def slot(self) -> int:
        return 0

    def slot_tokens(self, index: int) -> Sequence[int]:
        return self.cached_tokens

    def use_slot(self, index: int) -> None:
        if index != 0:
            raise IndexError("a slot view has one slot")

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    def tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text)

    def token_bytes(self, token_id: int) -> bytes:
        return self.backend.token_bytes(token_id)

    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        return self.backend.llg_tokenizer()

    @property
    def cached_tokens(self) -> Sequence[int]:
        return self.backend.slot_tokens(self.index)

    @property
    def owner(self) -> object | None:
        return self.backend._slot_owners[self.index]

    @owner.setter
    def owner(self, value: object | None) -> None:
        self.backend._slot_owners[self.index] = value

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        self.backend.use_slot(self.index)
        return self.backend.forward(tokens)

    def forward_all(self, tokens: Sequence[int], rows: Sequence[int] | None = None) -> np.ndarray:
        self.backend.use_slot(self.index)
        return self.backend.forward_all(tokens, rows)

    @property
    def verifies_drafts(self) -> bool:
        return self.backend.verifies_drafts

    def truncate_cache(self, n_keep: int) -> int:
        self.backend.use_slot(self.index)
        return self.backend.truncate_cache(n_keep)

    def remember_logits(self, logits: np.ndarray) -> None:
        self.backend.use_slot(self.index)
        self.backend.remember_logits(logits)

    def recall_logits(self, length: int) -> np.ndarray | None:
        self.backend.use_slot(self.index)
        return self.backend.recall_logits(length)

    def clear_cache(self) -> None:
        self.truncate_cache(0)

    def close(self) -> None:
        """A view owns nothing; closing the backend is the engine's business."""


class _SlotTokens(list[int]):
    """A slot's cached token ids, which remember the fewest they held since :meth:`mark`: a
    remembered pass's logits stay valid only while the tokens before them were never trimmed
    (re-evaluated tokens may be rounded otherwise)."""

    lowest = 0

    def mark(self) -> None:
        self.lowest = len(self)

    def __delitem__(self, key: SupportsIndex | slice) -> None:
        super().__delitem__(key)
        self.lowest = min(self.lowest, len(self))

    def clear(self) -> None:
        super().clear()
        self.lowest = 0

    def pop(self, index: SupportsIndex = -1) -> int:
        value = super().pop(index)
        self.lowest = min(self.lowest, len(self))
        return value


def output_rows(tokens: Sequence[int], rows: Sequence[int] | None) -> list[int]:
    """The ``rows`` argument of :meth:`Backend.forward_all`, checked: ascending indices into ``tokens``."""
    if rows is None:
        return list(range(len(tokens)))
    wanted = list(rows)
    ascending = all(a < b for a, b in itertools.pairwise(wanted))
    if not wanted or wanted[0] < 0 or wanted[-1] >= len(tokens) or not ascending:
        raise ValueError(f"rows must be ascending indices into the {len(tokens)} tokens, not {wanted}")
    return wanted
