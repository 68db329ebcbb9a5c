"""LLaVA-NeXT at run time: anyres tiling, packing (unpad + image_newline), and the image-token budget.

- Preprocessing equals transformers' `LlavaNextImageProcessorPil` bit for bit: the base image
  resized whole, then the grid tiles (grid chosen from `image_grid_pinpoints`) row-major.
- Packing mirrors `LlavaNextModel.pack_image_features` in numpy: the base image's tokens, then
  the grid tiles stitched into one feature map, cropped back to the original aspect ratio
  ("unpad"), with `image_newline` appended after every row.
- Budget: more grid tiles mean more image tokens (a 672x672 photo: 2,928 on llava-v1.6-mistral-7b).
  A budget keeps, per image, only the pinpoints whose token count fits and lets transformers'
  own rule (`select_best_resolution`) choose among them, so a budgeted image is exactly what
  transformers computes with that reduced pinpoint list. Below the smallest pinpoint the image
  is the base tile only (plus its `image_newline`), as LLaVA-NeXT packs a single-tile image.
"""

from __future__ import annotations

import math
from dataclasses import replace
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from llava_ov.families.base import LlavaConfigMapping
from llava_ov.runtime.budget import Pinpoints, Resolution
from llava_ov.runtime.export import ImageConfig
from llava_ov.runtime.image import ImageSource, ProcessedImage, best_resolution, fit_size, load_image, resize_crop, to_float

# ----------------------------------------------------------------------------- preprocessing


def preprocess_anyres(image: ImageSource, cfg: ImageConfig) -> ProcessedImage:
    """LLaVA-NeXT anyres: base image resized whole, then the grid tiles row-major.

    With no pinpoints (an image-token budget below the smallest grid) only the base tile."""
    img = load_image(image)
    h, w = img.height, img.width
    bh, bw = cfg.base_size
    if not cfg.image_grid_pinpoints:
        base = img.resize((bw, bh), resample=cfg.resample)
        return ProcessedImage(to_float([resize_crop(base, cfg)], cfg), (h, w), (0, 0))
    th, tw = best_resolution((h, w), cfg.image_grid_pinpoints)
    nh, nw = fit_size((h, w), (th, tw))
    canvas = np.zeros((th, tw, 3), np.uint8)  # zero (black) padding, odd pixel after
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas[top : top + nh, left : left + nw] = np.asarray(img.resize((nw, nh), resample=cfg.resample))
    p = cfg.patch_size
    tiles = [canvas[i : i + p, j : j + p] for i in range(0, th, p) for j in range(0, tw, p)]
    base = img.resize((bw, bh), resample=cfg.resample)
    pixels = to_float([resize_crop(t, cfg) for t in [base, *tiles]], cfg)
    return ProcessedImage(pixels, (h, w), (math.ceil(th / p), math.ceil(tw / p)))


# ----------------------------------------------------------------------------- packing


def unpad_bounds(current: tuple[int, int], original: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of a (h, w) feature map that hold the image, not the padding."""
    cur_h, cur_w = current
    orig_h, orig_w = original
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return slice(pad, cur_h - pad), slice(0, cur_w)
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return slice(0, cur_h), slice(pad, cur_w - pad)


def pack_anyres(
    tile_features: np.ndarray, image_size: tuple[int, int], grid: tuple[int, int], newline: np.ndarray | None
) -> np.ndarray:
    """[1 + rows*cols, side*side, C] tile features -> [N, C] packed sequence."""
    base, tiles = tile_features[0], tile_features[1:]
    if len(tiles) == 0:
        packed = base if newline is None else np.concatenate([base, newline[None]], axis=0)
        return np.ascontiguousarray(packed, dtype=np.float32)
    rows, cols = grid
    side = int(round(np.sqrt(tile_features.shape[1])))
    channels = tile_features.shape[-1]
    fmap = tiles.reshape(rows, cols, side, side, channels).transpose(0, 2, 1, 3, 4)
    fmap = fmap.reshape(rows * side, cols * side, channels)
    row_slice, col_slice = unpad_bounds(fmap.shape[:2], image_size)
    fmap = fmap[row_slice, col_slice]
    if newline is not None:
        column = np.broadcast_to(newline.astype(fmap.dtype), (fmap.shape[0], 1, channels))
        fmap = np.concatenate([fmap, column], axis=1)
    return np.ascontiguousarray(np.concatenate([base, fmap.reshape(-1, channels)], axis=0), dtype=np.float32)


def packed_length(tokens_per_tile: int, image_size: tuple[int, int], grid: tuple[int, int], newline: bool) -> int:
    """How many tokens `pack_anyres` will make of an image, from its sizes alone (before encoding)."""
    if grid[0] * grid[1] == 0:
        return tokens_per_tile + int(newline)
    side = int(round(np.sqrt(tokens_per_tile)))
    rows, cols = unpad_bounds((grid[0] * side, grid[1] * side), image_size)
    return tokens_per_tile + (rows.stop - rows.start) * (cols.stop - cols.start + int(newline))


def packed_tiles(tokens_per_tile: int, image_size: tuple[int, int], grid: tuple[int, int], newline: bool) -> np.ndarray:
    """Per packed position (as `pack_anyres` lays them out): the tile it comes from (0: the base
    image, 1..: grid tiles row-major), or -1 for an `image_newline` token."""
    base = np.zeros(tokens_per_tile, np.int64)
    if grid[0] * grid[1] == 0:
        return np.concatenate([base, [-1] * int(newline)]).astype(np.int64)
    rows, cols = grid
    side = int(round(np.sqrt(tokens_per_tile)))
    tile = (np.arange(rows)[:, None] * cols + np.arange(cols)[None, :] + 1).repeat(side, 0).repeat(side, 1)
    row_slice, col_slice = unpad_bounds(tile.shape, image_size)
    tile = tile[row_slice, col_slice]
    if newline:
        tile = np.concatenate([tile, np.full((tile.shape[0], 1), -1)], axis=1)
    return np.concatenate([base, tile.reshape(-1)]).astype(np.int64)


# ----------------------------------------------------------------------------- budget


def _grid(image_size: tuple[int, int], pinpoints: Pinpoints, patch: int) -> tuple[int, int]:
    height, width = best_resolution(image_size, pinpoints)
    return math.ceil(height / patch), math.ceil(width / patch)


def anyres_resolutions(
    image: ImageConfig, image_size: tuple[int, int], tokens: Callable[[tuple[int, int]], int], base_tokens: int
) -> list[Resolution]:
    """Every distinct resolution of an image, most tokens first: the model's default, then each
    reduced pinpoint list (the pinpoints with at most so many tokens), then the base tile only.

    `tokens(grid)`: the packed tokens of the image on a (rows, cols) grid; `base_tokens`: of the base tile alone."""
    pinpoints, patch = image.image_grid_pinpoints, image.patch_size
    cost = {p: tokens(_grid(image_size, (p,), patch)) for p in pinpoints}
    default_grid = _grid(image_size, pinpoints, patch)
    options = [Resolution(None, tokens(default_grid), default_grid)]
    for cap in sorted(set(cost.values()), reverse=True):
        subset = tuple(p for p in pinpoints if cost[p] <= cap)
        grid = _grid(image_size, subset, patch)
        if tokens(grid) < options[-1].tokens:
            options.append(Resolution(subset, tokens(grid), grid))
    if base_tokens < options[-1].tokens:
        options.append(Resolution((), base_tokens, (0, 0)))
    return options


# ----------------------------------------------------------------------------- the family


class LlavaNext(LlavaConfigMapping):
    """LLaVA-NeXT: anyres tiles, packed features, budgets by reduced pinpoint lists."""

    model_type = "llava_next"
    architecture = "LlavaNextForConditionalGeneration"

    def __init__(self, config: dict[str, Any], image: ImageConfig, video: ImageConfig | None = None):
        super().__init__(config, image, video)
        newline = config.get("image_newline")  # written into config.json by convert (as openvino_genai reads it)
        self.newline = np.asarray(newline, dtype=np.float32) if newline is not None else None

    def resolutions(self, image_size: tuple[int, int], images_in_prompt: int = 1) -> list[Resolution]:
        newline = self.newline is not None
        return anyres_resolutions(
            self.image, image_size, lambda grid: packed_length(self.tokens_per_tile, image_size, grid, newline),
            self.tokens_per_tile + int(newline),
        )

    def preprocess(self, image: Image.Image, resolution: Resolution) -> ProcessedImage:
        cfg = self.image if resolution.pinpoints is None else replace(self.image, image_grid_pinpoints=resolution.pinpoints)
        return preprocess_anyres(image, cfg)

    def pack(self, tile_features: np.ndarray, processed: ProcessedImage) -> np.ndarray:
        return pack_anyres(tile_features, processed.image_size, processed.grid, self.newline)

    def packed_tiles(self, image_size: tuple[int, int], resolution: Resolution) -> np.ndarray:
        return packed_tiles(self.tokens_per_tile, image_size, resolution.grid, self.newline is not None)


FAMILY = LlavaNext
