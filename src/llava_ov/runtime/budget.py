"""The image-token budget: the largest anyres resolution of each image that fits a request's budget.

LLaVA-NeXT picks each image's grid from the model's `image_grid_pinpoints`; more grid tiles mean
more image tokens (a 672x672 photo: 2,928 on llava-v1.6-mistral-7b) and a longer prefill. A
budget keeps, per image, only the pinpoints whose token count fits, and lets transformers' own
rule (`select_best_resolution`) choose among them, so a budgeted image is exactly what
transformers computes with that reduced pinpoint list. Below the smallest pinpoint the image is
the base tile only (plus its `image_newline`), as LLaVA-NeXT packs a single-tile image.
LLaVA-1.5 has one fixed tile per image: nothing to reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llava_ov.errors import ContextLengthError
from llava_ov.runtime.features import packed_length
from llava_ov.runtime.image import ImageConfig, best_resolution

Pinpoints = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ImageTokenRules:
    """How a model turns an image into tokens (from its config)."""

    tokens_per_tile: int
    newline: bool  # an image_newline token after every packed row
    packs: bool  # LLaVA-NeXT packing (anyres); False: one tile per image
    image: ImageConfig


@dataclass(frozen=True)
class Resolution:
    """One way to feed an image: the pinpoints it is preprocessed with and the tokens that makes.

    `pinpoints` None: the model's own list (no budget); (): the base tile only."""

    pinpoints: Pinpoints | None
    tokens: int
    grid: tuple[int, int]

    @property
    def label(self) -> str:
        if self.pinpoints is None:
            return "full"
        return "base" if not self.pinpoints else f"{self.grid[0]}x{self.grid[1]}"


def _grid(image_size: tuple[int, int], pinpoints: Pinpoints, patch: int) -> tuple[int, int]:
    height, width = best_resolution(image_size, pinpoints)
    return math.ceil(height / patch), math.ceil(width / patch)


def _tokens(rules: ImageTokenRules, image_size: tuple[int, int], grid: tuple[int, int]) -> int:
    tiles = 1 + grid[0] * grid[1]
    return packed_length(rules.tokens_per_tile, image_size, grid, tiles, rules.newline, rules.packs)


def resolutions(rules: ImageTokenRules, image_size: tuple[int, int]) -> list[Resolution]:
    """Every distinct resolution of an image, most tokens first: the model's default, then each
    reduced pinpoint list (the pinpoints with at most so many tokens), then the base tile only."""
    if not rules.packs:
        return [Resolution(None, rules.tokens_per_tile, (1, 1))]
    pinpoints = rules.image.image_grid_pinpoints
    patch = rules.image.patch_size
    cost = {p: _tokens(rules, image_size, _grid(image_size, (p,), patch)) for p in pinpoints}
    default_grid = _grid(image_size, pinpoints, patch)
    options = [Resolution(None, _tokens(rules, image_size, default_grid), default_grid)]
    for cap in sorted(set(cost.values()), reverse=True):
        subset = tuple(p for p in pinpoints if cost[p] <= cap)
        grid = _grid(image_size, subset, patch)
        tokens = _tokens(rules, image_size, grid)
        if tokens < options[-1].tokens:
            options.append(Resolution(subset, tokens, grid))
    base = rules.tokens_per_tile + int(rules.newline)
    if base < options[-1].tokens:
        options.append(Resolution((), base, (0, 0)))
    return options


def fit_budget(options: list[list[Resolution]], budget: int | None) -> list[Resolution]:
    """One resolution per image, all together within `budget` tokens.

    Starts from every image's default and lowers, one step at a time, the image that has the most
    tokens (the first such image on ties) until the total fits; ContextLengthError when even the
    smallest resolutions do not."""
    level = [0] * len(options)
    if budget is None:
        return [opts[0] for opts in options]
    if budget < 1:
        raise ContextLengthError(f"max_image_tokens must be >= 1 (got {budget})")

    def total() -> int:
        return sum(opts[i].tokens for opts, i in zip(options, level))

    while total() > budget:
        lowerable = [k for k, opts in enumerate(options) if level[k] + 1 < len(opts)]
        if not lowerable:
            smallest = total()
            raise ContextLengthError(
                f"max_image_tokens={budget} is below the {smallest} tokens that {len(options)} image(s) "
                f"need at the lowest resolution; raise it to at least {smallest}"
            )
        k = max(lowerable, key=lambda j: (options[j][level[j]].tokens, -j))
        level[k] += 1
    return [opts[i] for opts, i in zip(options, level)]
