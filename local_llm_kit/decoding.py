"""The one decode loop every backend runs through.

prefix reuse -> prefill -> [logits -> bias/penalties -> constraint mask -> sample ->
detokenize -> stop?]* . Backends only evaluate tokens; everything that decides *which* token
comes next, and what text the user sees, happens here, once.

Speculation (prompt lookup, :mod:`local_llm_kit.speculation`) changes only how many positions
one forward pass evaluates: the drafted tokens ride along with the chosen one, and each position's
logits then go through exactly the same steps as without a draft. A draft token is kept only
when the token chosen at its position is that very token, so the output (sampled ones included,
the random generator being drawn once per position either way) is the one decoding gives without
drafts, as far as the engine computes a position's logits the same in a batch as alone (see the
README: transformers in float32 does; bfloat16 and llama.cpp's CPU kernels round differently).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from local_llm_kit.backends.base import Backend
from local_llm_kit.sampling import Sampler, SamplingParams, log_softmax
from local_llm_kit.slots import common_prefix_length as _common_prefix_length
from local_llm_kit.speculation import PassCosts, PromptLookup
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

    def draft_outputs(self, tokens: Sequence[int]) -> list[bool]:
        """Which logits verifying the draft ``tokens`` needs, judged from here (nothing is consumed).

        The list is one longer than the part of ``tokens`` the grammar accepts in a row (a drafted
        token it forbids ends the draft). Item ``j`` is False where, after the first ``j`` drafted
        tokens, the grammar forces the next token: the loop never samples there, so the logits
        after that position need not be computed."""


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int
    """Hard cap on sampled tokens (already clipped to the context window by the caller)."""
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    """None: no logprobs; 0..20: logprobs with that many alternatives per token."""
    draft_tokens: int = 0
    """Prompt-lookup speculation: the longest draft verified per forward pass (0: off)."""


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
    if common == len(prompt):
        # The whole prompt is cached (the same request again, another choice of ``n``): the logits
        # its own pass gave, not its last token's evaluated alone, which rounds otherwise.
        remembered = backend.recall_logits(len(prompt))
        if remembered is not None and backend.truncate_cache(len(prompt)) == len(prompt):
            return remembered
    # At least one token must be evaluated to get logits for the position after the prompt.
    common = min(common, len(prompt) - 1)
    kept = backend.truncate_cache(common)
    logits = backend.forward(prompt[kept:])
    backend.remember_logits(logits)
    return logits


def _describe(backend: Backend, token: int) -> tuple[str, list[int]]:
    raw = backend.token_bytes(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _forced_entry(backend: Backend, token: int, top: int) -> TokenLogprob:
    """A token the grammar forced: the only one the constrained distribution allowed (probability 1),
    so that a reply's logprobs have one entry per token and spell out its text."""
    text, raw = _describe(backend, token)
    alternatives = [TopLogprob(token=text, logprob=0.0, bytes=raw)] if top else []
    return TokenLogprob(token=text, logprob=0.0, bytes=raw, top_logprobs=alternatives)


def _logprob_entry(backend: Backend, token: int, logprobs: np.ndarray, top: int) -> TokenLogprob:
    alternatives: list[TopLogprob] = []
    if top:
        best = np.argpartition(-logprobs, top - 1)[:top]
        best = best[np.isfinite(logprobs[best])]  # a constraint's mask may leave fewer than ``top``
        for tid in best[np.argsort(-logprobs[best], kind="stable")]:
            text, raw = _describe(backend, int(tid))
            alternatives.append(TopLogprob(token=text, logprob=float(logprobs[tid]), bytes=raw))
    text, raw = _describe(backend, token)
    return TokenLogprob(token=text, logprob=float(logprobs[token]), bytes=raw, top_logprobs=alternatives)


def generate(
    backend: Backend,
    prompt: Sequence[int],
    settings: GenerationSettings,
    *,
    constraint: Constraint | None = None,
    cancel: threading.Event | None = None,
    pass_costs: PassCosts | None = None,
) -> Iterator[TextPiece | Finished]:
    """Generate after ``prompt``; yields text pieces, then exactly one :class:`Finished`.

    The caller holds the engine's lock for the whole iteration. Closing the generator (or
    setting ``cancel``) stops evaluation before the next token. ``pass_costs`` carries what
    forward passes cost on this engine from one generation to the next (for speculation).
    """
    eos = backend.info.eos_token_ids
    sampler = Sampler(settings.sampling)
    decoder = IncrementalDecoder()
    stops = StopStringMatcher(settings.stop)
    want_logprobs = settings.top_logprobs is not None
    generated: list[int] = []
    limit = min(settings.max_tokens, backend.n_ctx - len(prompt))
    lookup = PromptLookup(prompt, settings.draft_tokens, pass_costs) if settings.draft_tokens > 0 else None
    verified = _Verified()

    steered = False
    owner = object()
    logits = prefill(backend, prompt)
    backend.owner = owner
    while True:
        if cancel is not None and cancel.is_set():
            return
        remaining = limit - len(generated)
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
            forced = forced[:limit - len(generated)]
            for forced_token in forced:
                sampler.accept(forced_token)
            generated.extend(forced)
            new_tokens.extend(forced)

        text = decoder.feed(b"".join(backend.token_bytes(t) for t in new_tokens))
        visible, stopped = stops.push(text)
        logprob_entries = None if entry is None else [
            entry, *(_forced_entry(backend, t, settings.top_logprobs or 0) for t in new_tokens[1:])]
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
        if len(generated) < limit:
            if lookup is not None:
                lookup.extend(new_tokens)
            if backend.owner is not owner:
                # Another generation used the cache in between: rebuild ours from its prefix.
                verified.drop(lookup)
                logits = prefill(backend, [*prompt, *generated])
                backend.owner = owner
                continue
            pending, ready = verified.take(new_tokens)
            if ready is not None:
                logits = ready  # every new token was drafted and verified already
                continue
            if not verified.reject(backend, lookup, len(prompt) + len(generated) - len(pending)):
                logits = prefill(backend, [*prompt, *generated])  # the cache could not be trimmed
                continue
            draft: list[int] = []
            outputs = [True]
            if lookup is not None:
                # A draft is worth verifying only where its tokens and one more could still be generated.
                draft, outputs = lookup.plan(limit - len(generated) - 1, pending=len(pending),
                                             outputs_of=None if constraint is None else constraint.draft_outputs)
            started = time.perf_counter()
            if draft:
                # Logits after the last pending token (this step's) and after each drafted token
                # where the next one is sampled, not forced.
                wanted = [len(pending) - 1 + j for j, needed in enumerate(outputs) if needed]
                rows = iter(backend.forward_all([*pending, *draft], rows=wanted))
                logits = next(rows)  # ``outputs[0]`` is always True: this step samples
                verified.hold(draft, [next(rows) if needed else None for needed in outputs[1:]])
            else:
                logits = backend.forward(pending)
            if lookup is not None:
                lookup.costs.record(len(pending) + len(draft), time.perf_counter() - started, rows=sum(outputs))


class _Verified:
    """Drafted tokens already evaluated in the KV cache, each with the logits that follow it."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.rows: list[np.ndarray | None] = []  # None: not computed (the grammar forces the next token)
        self.proposed = 0
        self.kept = 0

    def hold(self, draft: list[int], rows: list[np.ndarray | None]) -> None:
        self.tokens, self.rows = list(draft), rows
        self.proposed, self.kept = len(draft), 0

    def take(self, new_tokens: list[int]) -> tuple[list[int], np.ndarray | None]:
        """Match the step's tokens against the draft: the tokens still to evaluate, and the next
        position's logits when all of them were drafted (already in the KV cache)."""
        matched = 0
        while (matched < len(new_tokens) and matched < len(self.tokens)
               and self.tokens[matched] == new_tokens[matched]):
            matched += 1
        if matched == len(new_tokens) and self.rows[matched - 1] is None:
            # The step ended where the grammar was to force more (a forced run cut by the budget):
            # no logits there. The last token goes back to the draft's tail, which is trimmed from
            # the cache, and is evaluated again.
            matched -= 1
        logits = self.rows[matched - 1] if matched else None
        del self.tokens[:matched], self.rows[:matched]
        self.kept += matched
        return new_tokens[matched:], logits if matched == len(new_tokens) else None

    def reject(self, backend: Backend, lookup: PromptLookup | None, expected: int) -> bool:
        """Forget the draft's unused tail, in the KV cache too; False when the cache no longer
        holds the ``expected`` tokens (an engine that cannot trim to any length kept fewer)."""
        if self.tokens:
            backend.truncate_cache(len(backend.cached_tokens) - len(self.tokens))
        self.drop(lookup)
        return len(backend.cached_tokens) == expected

    def drop(self, lookup: PromptLookup | None) -> None:
        """Forget the draft (the cache is being rebuilt anyway); tell the drafter how it fared."""
        if lookup is not None and self.proposed:
            lookup.feedback(self.proposed, self.kept)
        self.tokens, self.rows, self.proposed, self.kept = [], [], 0, 0
