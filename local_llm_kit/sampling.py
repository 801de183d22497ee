"""Turning one step's logits into a token: biases, penalties, temperature, nucleus sampling.

All of it is numpy on the last position's logits, shared by every backend, so two backends
that return the same logits sample the same token for the same seed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Sampler", "SamplingParams", "log_softmax"]

# Nucleus sampling looks at this many best candidates first; a full sort of a 262k vocabulary
# per token would cost more than the model's forward pass on small models.
_TOP_CANDIDATES = 1024


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits)
    result: np.ndarray = shifted - np.log(np.sum(np.exp(shifted)))
    return result


class Sampler:
    """Samples tokens for one generation; holds its random state and penalty counts."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        # Created at the first sampled token: an unseeded generator reads OS entropy (a tenth
        # of a millisecond), which greedy requests never need.
        self._rng: np.random.Generator | None = None
        self._counts: Counter[int] = Counter()
        if params.logit_bias:
            self._bias_ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64)
            self._bias_values = np.fromiter(params.logit_bias.values(), dtype=np.float32)

    def process(self, logits: np.ndarray) -> np.ndarray:
        """Apply logit bias and penalties in place; returns ``logits`` for chaining."""
        p = self.params
        if p.logit_bias:
            logits[self._bias_ids] += self._bias_values
        if self._counts and (p.presence_penalty or p.frequency_penalty):
            ids = np.fromiter(self._counts.keys(), dtype=np.int64)
            counts = np.fromiter(self._counts.values(), dtype=np.float32)
            logits[ids] -= counts * p.frequency_penalty + p.presence_penalty
        return logits

    def sample(self, logits: np.ndarray) -> int:
        """Choose the next token from processed logits."""
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        # Shifted before dividing: with a tiny temperature (1e-308) unshifted logits overflow to
        # inf, and inf - inf below is NaN; shifted ones only reach -inf, which exp() maps to 0.
        shifted = logits.astype(np.float64)
        with np.errstate(over="ignore"):
            scaled = (shifted - np.max(shifted)) / p.temperature
        k = min(_TOP_CANDIDATES, scaled.shape[0])
        candidates = np.argpartition(-scaled, k - 1)[:k] if k < scaled.shape[0] else np.arange(k)
        probs = np.exp(scaled - np.max(scaled))
        total = probs.sum()
        cand_probs = probs[candidates]
        if p.top_p < 1.0 and cand_probs.sum() / total < p.top_p:
            candidates = np.arange(scaled.shape[0])  # the head is too flat: look at everything
            cand_probs = probs
        order = np.argsort(-cand_probs, kind="stable")
        candidates, cand_probs = candidates[order], cand_probs[order] / total
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(cand_probs), p.top_p)) + 1
            candidates, cand_probs = candidates[:keep], cand_probs[:keep]
        cand_probs = cand_probs / cand_probs.sum()
        if self._rng is None:
            self._rng = np.random.default_rng(None if p.seed is None else p.seed % 2**64)
        return int(candidates[self._rng.choice(len(candidates), p=cand_probs)])

    def accept(self, token: int) -> None:
        """Record a generated token (for presence and frequency penalties)."""
        self._counts[token] += 1
