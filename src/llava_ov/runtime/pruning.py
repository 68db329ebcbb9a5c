"""Visual-token pruning with CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing
Conditional Diversity for Token Pruning in MLLMs", arXiv 2506.10967, NeurIPS 2025).

Training-free and query-conditioned: keep the image tokens whose *conditional diversity* is
largest, by MAP inference of a determinantal point process (DPP) over them.

1. Similarity: cosine similarity S between the tokens' features (the projector's output).
2. Relevance: each token's mean cosine similarity to the instruction's token embeddings,
   min-max normalised over the image's tokens (r in [0, 1]).
3. Conditional kernel: L = diag(r) S diag(r), a DPP favouring tokens that are both relevant
   and unlike each other.
4. Selection: the fast greedy MAP inference of Chen et al. (NeurIPS 2018), which the paper uses:
   each step adds the token with the largest marginal gain in log det(L_Y), updating Cholesky
   rows incrementally (O(k^2 n) for k of n tokens).

As in the paper's LLaVA-NeXT setting, each tile (the base image and every grid tile) is a DPP of
its own and the `image_newline` tokens of the packed layout are always kept; tile quotas are
proportional to the tokens each tile has after unpadding (largest remainder), so exactly
round((1 - ratio) * n) of an image's n non-newline tokens are kept. The kept tokens keep the
positions they had in the full prompt (the pipeline feeds those position ids).

Where this differs from the paper, for lack of the model part it needs: for LLaVA the paper
takes the relevance from CLIP's own text encoder (and CLIP's projection of the image tokens);
LLaVA checkpoints ship only CLIP's vision tower, so the relevance here compares the projected
image tokens with the language model's input embeddings of the instruction (the same space;
what the paper's code does for models without a CLIP text tower, and what OpenVINO GenAI's
CDPruner does). When the instruction is empty or every token is equally relevant, r = 1 and the
selection is the plain (unconditional) DPP MAP.
"""

from __future__ import annotations

import numpy as np

# A marginal gain below this share of the largest diagonal entry means the remaining tokens add nothing
# new (the kernel's rank is used up; float32 similarities leave ~1e-7 of noise there).
REL_EPS = 1e-5


def _unit(x: np.ndarray, dtype=np.float64) -> np.ndarray:
    x = np.asarray(x, dtype=dtype)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def relevance(features: np.ndarray, instruction: np.ndarray) -> np.ndarray:
    """[n] relevance in (0, 1]: mean cosine similarity to the instruction's tokens, min-max normalised
    (all ones when there is no instruction or no spread)."""
    if len(instruction) == 0 or len(features) == 0:
        return np.ones(len(features))
    scores = (_unit(features, np.float32) @ _unit(instruction, np.float32).T).astype(np.float64).mean(axis=1)
    spread = scores.max() - scores.min()
    if spread < 1e-9:
        return np.ones(len(features))
    return (scores - scores.min() + 1e-6) / spread  # the paper's +1e-6: the least relevant token stays selectable


def conditional_kernel(features: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """L = diag(r) S diag(r) with S the cosine similarity of the features.

    S is computed in float32 (as the paper's code does; the [n, 4096] product is the selection's main
    cost) and symmetrised, then used in float64 by the greedy updates."""
    unit = _unit(features, np.float32)
    similarity = (unit @ unit.T).astype(np.float64)
    similarity = (similarity + similarity.T) / 2
    return rel[:, None] * similarity * rel[None, :]


def greedy_map(kernel: np.ndarray, k: int, fallback: np.ndarray | None = None) -> list[int]:
    """Indices of `k` items in the order the fast greedy DPP MAP picks them (Chen et al. 2018, Alg. 1).

    Once no item adds a positive gain (the kernel's rank is used up), the rest are the highest
    `fallback` scores (e.g. relevance) among the unpicked, lowest index first on ties."""
    n = kernel.shape[0]
    k = min(k, n)
    gains = np.diag(kernel).astype(np.float64).copy()  # d_i^2: marginal gain of each item
    eps = REL_EPS * float(gains.max(initial=0.0))
    rows = np.zeros((k, n))  # c_i: incremental Cholesky rows
    picked: list[int] = []
    free = np.ones(n, bool)
    while len(picked) < k:
        j = int(np.argmax(np.where(free, gains, -np.inf)))
        if gains[j] <= eps:
            break
        t = len(picked)
        e = (kernel[j] - rows[:t, j] @ rows[:t]) / np.sqrt(gains[j])
        rows[t] = e
        gains -= e * e
        picked.append(j)
        free[j] = False
    if len(picked) < k:
        score = np.zeros(n) if fallback is None else np.asarray(fallback, np.float64)
        rest = np.flatnonzero(free)
        rest = rest[np.lexsort((rest, -score[rest]))]
        picked += rest[: k - len(picked)].tolist()
    return picked


def tile_quotas(sizes: list[int], keep: int) -> list[int]:
    """Split `keep` over tiles in proportion to their sizes (largest remainder, earlier tile first on ties)."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [keep * s / total for s in sizes]
    quota = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - quota[i]), i))
    for i in order[: keep - sum(quota)]:
        quota[i] += 1
    return quota


def kept_count(visual_tokens: int, ratio: float) -> int:
    """Non-newline tokens kept of `visual_tokens` at `ratio` (at least one)."""
    if visual_tokens == 0:
        return 0
    return min(visual_tokens, max(1, int(round((1.0 - ratio) * visual_tokens))))


def select_tokens(features: np.ndarray, tiles: np.ndarray, instruction: np.ndarray, ratio: float) -> np.ndarray:
    """Sorted indices of the packed image tokens to keep.

    features: [n, C] packed image features; tiles: [n] tile of each (-1: image_newline, always
    kept); instruction: [m, C] the instruction's token embeddings; ratio in [0, 1)."""
    visual = np.flatnonzero(tiles >= 0)
    if ratio <= 0 or len(visual) == 0:
        return np.arange(len(features))
    rel = np.zeros(len(features))
    rel[visual] = relevance(features[visual], instruction)
    tile_ids = np.unique(tiles[visual])
    members = [visual[tiles[visual] == t] for t in tile_ids]
    quotas = tile_quotas([len(m) for m in members], kept_count(len(visual), ratio))
    kept = [np.flatnonzero(tiles < 0)]
    for idx, quota in zip(members, quotas):
        if quota:
            kernel = conditional_kernel(features[idx], rel[idx])
            kept.append(idx[greedy_map(kernel, quota, fallback=rel[idx])])
    return np.sort(np.concatenate(kept)).astype(np.int64)
