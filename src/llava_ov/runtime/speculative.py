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
            return _text_only(context[start : start + count])
    return context[:0]


def _text_only(tokens: np.ndarray) -> np.ndarray:
    """`tokens` up to the first image position (a proposal is text)."""
    images = np.flatnonzero(tokens < 0)
    return tokens[: images[0]] if len(images) else tokens


@dataclass
class SpeculationStats:
    """Tokens proposed and accepted over one answer (also the engine's totals)."""

    proposed: int = 0
    accepted: int = 0

    def add(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted


class Backoff:
    """Rest after proposals that all failed, for 1, 2, 4 ... `longest` steps; any kept proposal resets it.
    `start`: the first rest (a proposer known to miss may start resting)."""

    def __init__(self, longest: int = MAX_BACKOFF, start: int = 0) -> None:
        self.longest = longest
        self.rest = start  # steps left before the next proposal
        self.length = max(1, min(2 * start, longest))  # how long the next full miss rests

    def resting(self) -> bool:
        """True (and one step of rest spent) while resting."""
        if self.rest > 0:
            self.rest -= 1
            return True
        return False

    def verified(self, proposed: int, accepted: int) -> None:
        if not proposed:
            return
        if accepted:
            self.length = 1
        else:
            self.rest, self.length = self.length, min(2 * self.length, self.longest)


class PromptLookup:
    """One sequence's prompt-lookup proposer: `lookup` kept incremental (an index of where each n-gram was
    last followed by a token, updated with the tokens known since the last step), resting after
    proposals that failed."""

    def __init__(self, tokens: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        self.tokens = tokens
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> the position after its latest occurrence
        self.indexed = 0  # n-grams ending before this position are in `after`
        self.backoff = Backoff()

    def propose(self, context: np.ndarray, room: int) -> list[int]:
        self._index(context)
        if self.backoff.resting():
            return []
        size = len(context)
        for n in self.sizes:
            start = self.after.get(tuple(context[size - n :].tolist())) if size > n else None
            if start is not None:
                return _text_only(context[start : start + min(self.tokens, room)]).tolist()
        return []

    def _index(self, context: np.ndarray) -> None:
        """Add the n-grams ending before the last position (the last one is what a lookup looks for)."""
        end = len(context) - 1
        if end <= self.indexed:
            return
        first = max(0, self.indexed - max(self.sizes) + 1)
        window = context[first:end].tolist()
        for i in range(self.indexed - first, len(window)):
            for n in self.sizes:
                if i + 1 >= n:
                    gram = tuple(window[i + 1 - n : i + 1])
                    if min(gram) >= 0:  # image positions never match
                        self.after[gram] = first + i + 1
        self.indexed = end

    def verified(self, proposed: int, accepted: int) -> None:
        """Learn from the last proposal: none accepted rests the lookup (longer each time), any resets it."""
        self.backoff.verified(proposed, accepted)
