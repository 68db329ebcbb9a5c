"""The image-token budget: the largest resolution of each image that fits a request's budget.

A family lists the resolutions an image can be fed at (`Family.resolutions`, most tokens first:
LLaVA-NeXT's reduced pinpoint lists, LLaVA-1.5's one fixed tile); `fit_budget` picks one per
image so that all of a request's images fit together.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_ov.errors import ContextLengthError

Pinpoints = tuple[tuple[int, int], ...]


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
