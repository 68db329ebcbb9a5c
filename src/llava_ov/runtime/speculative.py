"""Several tokens per forward: which tokens a sequence proposes for the engine to verify.

A decoding sequence may carry proposed tokens after its last one; the engine computes them in the
same forward and `DecodeState.next` samples each position from the model's own logits, keeping the
proposals while they equal what it sampled. Both proposers here are deterministic (a proposal is a
point mass), and for such a draft that rule *is* speculative sampling (Leviathan et al. 2023,
Chen et al. 2023): a proposal is kept with the model's probability of it, and a rejected position's
token follows the model's distribution without it. So greedy answers are identical to plain decoding,
and so are seeded samples (each position draws from the same generator in the same order).

- **Grammar jump-forward**: the tokens the grammar forces next (llguidance's forced tokens:
  JSON keys, punctuation, enum tails) are proposed instead of being sampled one forward each.
- **Prompt lookup**: the tokens that followed the latest earlier occurrence of the context's last
  n-gram (prompt and answer so far; Saxena 2023, transformers' `prompt_lookup_num_tokens`).
  A lookup whose proposals keep failing backs off for a growing number of steps, so text that
  never repeats pays almost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_PROPOSED = 16  # tokens proposed per step, at most (a forward of 17 tokens still runs the decode variant)
MAX_NGRAM, MIN_NGRAM = 3, 2  # n-gram sizes prompt lookup matches, longest first
MAX_BACKOFF = 32  # steps a failing lookup rests, at most


def lookup(context: np.ndarray, count: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> np.ndarray:
    """Up to `count` tokens that followed the latest earlier occurrence of `context`'s last n-gram (the
    longest n from `max_ngram` down to `min_ngram` that occurs); empty when none does. Image positions
    (negative keys) never match text."""
    size = len(context)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        pattern = context[size - n :]
        if (pattern < 0).any():
            continue
        windows = np.lib.stride_tricks.sliding_window_view(context[: size - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return context[start : start + count]
    return context[:0]


@dataclass
class SpeculationStats:
    """Tokens proposed and accepted over one answer (also the engine's totals)."""

    proposed: int = 0
    accepted: int = 0

    def add(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted


class PromptLookup:
    """One sequence's prompt-lookup proposer, resting after proposals that failed."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.rest = 0  # steps left before the next lookup
        self.backoff = 1  # how long the next full miss rests

    def propose(self, context: np.ndarray, room: int) -> list[int]:
        if self.rest > 0:
            self.rest -= 1
            return []
        return [int(t) for t in lookup(context, min(self.tokens, room))]

    def verified(self, proposed: int, accepted: int) -> None:
        """Learn from the last proposal: none accepted rests the lookup (longer each time), any resets it."""
        if not proposed:
            return
        if accepted:
            self.backoff = 1
        else:
            self.rest, self.backoff = self.backoff, min(2 * self.backoff, MAX_BACKOFF)
