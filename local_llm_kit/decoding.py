"""The one decode loop every backend runs through.

prefix reuse -> prefill -> [logits -> bias/penalties -> constraint mask -> sample ->
detokenize -> stop?]* . Backends only evaluate tokens; everything that decides *which* token
comes next, and what text the user sees, happens here, once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from local_llm_kit.backends.base import Backend
from local_llm_kit.sampling import Sampler, SamplingParams, log_softmax
from local_llm_kit.slots import common_prefix_length as _common_prefix_length
from local_llm_kit.text import IncrementalDecoder, StopStringMatcher
from local_llm_kit.types import TokenLogprob, TopLogprob

__all__ = [
    "Constraint",
    "Finished",
    "GenerationSettings",
    "TextPiece",
    "common_prefix_length",
    "generate",
    "prefill",
]


class Constraint(Protocol):
    """Restricts which tokens may come next (structured output); one per generation."""

    def mask_logits(self, logits: np.ndarray) -> None:
        """Set the logits of every token the grammar forbids now to ``-inf``, in place."""

    def allows(self, token: int) -> bool:
        """Whether ``token`` may come next. The loop checks the sampled token first and builds the
        full mask only when it is rejected: exact for greedy and pure-temperature sampling, as
        llama.cpp's grammar sampler does, and far cheaper than a mask over a large vocabulary."""

    def consume(self, token: int) -> list[int]:
        """Advance past ``token``; return tokens the grammar now forces (already consumed)."""

    def is_complete(self) -> bool:
        """True once the grammar is satisfied and allows nothing but ending."""

    def fit(self, token: int, remaining: int) -> int | None:
        """The token to take, given that at most ``remaining`` tokens (this one included) may follow:
        ``token`` itself while the structure can still be completed after it, else the next token of
        a completion the grammar accepts; None when the reply is complete and nothing more fits."""


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int
    """Hard cap on sampled tokens (already clipped to the context window by the caller)."""
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    """None: no logprobs; 0..20: logprobs with that many alternatives per token."""


@dataclass
class TextPiece:
    """Text that became safe to show, and the tokens sampled since the previous piece."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finished:
    reason: Literal["stop", "length"]
    token_ids: list[int] = field(default_factory=list)
    """Every token sampled or forced, including a final end-of-sequence token."""

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    # Compared in C-level slices: a warm turn compares thousands of cached tokens with the prompt.
    return _common_prefix_length(a, b)


def prefill(backend: Backend, prompt: Sequence[int]) -> np.ndarray:
    """Evaluate ``prompt``, re-using the longest cached prefix; return the next-token logits."""
    common = common_prefix_length(backend.cached_tokens, prompt)
    # At least one token must be evaluated to get logits for the position after the prompt.
    common = min(common, len(prompt) - 1)
    kept = backend.truncate_cache(common)
    return backend.forward(prompt[kept:])


def _logprob_entry(backend: Backend, token: int, logprobs: np.ndarray, top: int) -> TokenLogprob:
    def describe(tid: int) -> tuple[str, list[int]]:
        raw = backend.token_bytes(tid)
        return raw.decode("utf-8", errors="replace"), list(raw)

    alternatives: list[TopLogprob] = []
    if top:
        best = np.argpartition(-logprobs, top - 1)[:top]
        best = best[np.isfinite(logprobs[best])]  # a constraint's mask may leave fewer than ``top``
        for tid in best[np.argsort(-logprobs[best], kind="stable")]:
            text, raw = describe(int(tid))
            alternatives.append(TopLogprob(token=text, logprob=float(logprobs[tid]), bytes=raw))
    text, raw = describe(token)
    return TokenLogprob(token=text, logprob=float(logprobs[token]), bytes=raw, top_logprobs=alternatives)


def generate(
    backend: Backend,
    prompt: Sequence[int],
    settings: GenerationSettings,
    *,
    constraint: Constraint | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[TextPiece | Finished]:
    """Generate after ``prompt``; yields text pieces, then exactly one :class:`Finished`.

    The caller holds the engine's lock for the whole iteration. Closing the generator (or
    setting ``cancel``) stops evaluation before the next token.
    """
    eos = backend.info.eos_token_ids
    sampler = Sampler(settings.sampling)
    decoder = IncrementalDecoder()
    stops = StopStringMatcher(settings.stop)
    want_logprobs = settings.top_logprobs is not None
    generated: list[int] = []

    steered = False
    owner = object()
    logits = prefill(backend, prompt)
    backend.owner = owner
    while True:
        if cancel is not None and cancel.is_set():
            return
        remaining = min(settings.max_tokens - len(generated), backend.n_ctx - len(prompt) - len(generated))
        fitted: int | None = None
        if remaining > 0:
            sampler.process(logits)
            if constraint is not None and want_logprobs:
                constraint.mask_logits(logits)  # logprobs must describe the distribution sampled from
            token = sampler.sample(logits)
            if constraint is not None and not want_logprobs and not constraint.allows(token):
                constraint.mask_logits(logits)
                token = sampler.sample(logits)
            # Budget-aware closing: near the end of the budget a structure is steered to a
            # completion the grammar accepts, so a reply cut by max_tokens still parses.
            fitted = token if constraint is None else constraint.fit(token, remaining)
        if fitted is None:
            tail = decoder.flush() + stops.flush()
            if tail:
                yield TextPiece(tail, [])
            yield Finished("length", generated)
            return
        # A reply steered to its end by the budget was cut, whatever way it ends now.
        steered = steered or fitted != token
        token = fitted
        entry = None
        if want_logprobs:
            entry = _logprob_entry(backend, token, log_softmax(logits), settings.top_logprobs or 0)
        sampler.accept(token)
        generated.append(token)
        new_tokens = [token]

        if token in eos:
            tail = decoder.flush() + stops.flush()
            yield TextPiece(tail, [token], None if entry is None else [entry])
            yield Finished("length" if steered else "stop", generated)
            return

        if constraint is not None:
            forced = constraint.consume(token)
            # The budget check above keeps forced tokens within it; this cut is a last resort.
            room = min(settings.max_tokens, backend.n_ctx - len(prompt)) - len(generated)
            forced = forced[:room]
            for forced_token in forced:
                sampler.accept(forced_token)
            generated.extend(forced)
            new_tokens.extend(forced)

        text = decoder.feed(b"".join(backend.token_bytes(t) for t in new_tokens))
        visible, stopped = stops.push(text)
        logprob_entries = None if entry is None else [entry]
        if stopped:
            yield TextPiece(visible, new_tokens, logprob_entries)
            yield Finished("stop", generated)
            return
        if visible or new_tokens:
            yield TextPiece(visible, new_tokens, logprob_entries)
        if constraint is not None and constraint.is_complete():
            tail = decoder.flush() + stops.flush()
            if tail:
                yield TextPiece(tail, [])
            yield Finished("length" if steered else "stop", generated)
            return
        if len(generated) < settings.max_tokens and len(prompt) + len(generated) < backend.n_ctx:
            if backend.owner is owner:
                logits = backend.forward(new_tokens)
            else:  # another generation used the cache in between: rebuild ours from its prefix
                logits = prefill(backend, [*prompt, *generated])
                backend.owner = owner
