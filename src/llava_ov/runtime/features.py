"""Image features -> prompt embeddings: LLaVA-NeXT packing and the merge at `<image>`.

LLaVA-NeXT packs per-tile features into one sequence: the base image's tokens,
then the grid tiles stitched into one feature map, cropped back to the
original aspect ratio ("unpad"), with `image_newline` appended after every row.
LLaVA-1.5 uses the single tile's tokens as they are.  Mirrors
transformers' `LlavaNextModel.pack_image_features` in numpy.
"""

from __future__ import annotations

import numpy as np


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
        return base if newline is None else np.concatenate([base, newline[None]], axis=0)
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
    return np.concatenate([base, fmap.reshape(-1, channels)], axis=0)


def packed_length(
    tokens_per_tile: int, image_size: tuple[int, int], grid: tuple[int, int], tiles: int, newline: bool, packs: bool
) -> int:
    """How many tokens `pack_features` will make of an image, from its sizes alone (before encoding)."""
    if not packs:
        return tokens_per_tile
    if tiles == 1:
        return tokens_per_tile + int(newline)
    side = int(round(np.sqrt(tokens_per_tile)))
    rows, cols = unpad_bounds((grid[0] * side, grid[1] * side), image_size)
    return tokens_per_tile + (rows.stop - rows.start) * (cols.stop - cols.start + int(newline))


def packed_tiles(
    tokens_per_tile: int, image_size: tuple[int, int], grid: tuple[int, int], tiles: int, newline: bool, packs: bool
) -> np.ndarray:
    """Per packed position (as `pack_features` lays them out): the tile it comes from (0: the base
    image, 1..: grid tiles row-major), or -1 for an `image_newline` token."""
    base = np.zeros(tokens_per_tile, np.int64)
    if not packs:
        return base
    if tiles == 1:
        return np.concatenate([base, [-1] * int(newline)]).astype(np.int64)
    rows, cols = grid
    side = int(round(np.sqrt(tokens_per_tile)))
    tile = (np.arange(rows)[:, None] * cols + np.arange(cols)[None, :] + 1).repeat(side, 0).repeat(side, 1)
    row_slice, col_slice = unpad_bounds(tile.shape, image_size)
    tile = tile[row_slice, col_slice]
    if newline:
        tile = np.concatenate([tile, np.full((tile.shape[0], 1), -1)], axis=1)
    return np.concatenate([base, tile.reshape(-1)]).astype(np.int64)


def pack_single(tile_features: np.ndarray, image_size=None, grid=None, newline=None) -> np.ndarray:
    """LLaVA-1.5: the one tile's tokens, unchanged."""
    return tile_features.reshape(-1, tile_features.shape[-1])


def pack_features(tile_features, image_size, grid, newline, packs: bool) -> np.ndarray:
    """Pack one image's tile features the way its family does."""
    fn = pack_anyres if packs else pack_single
    return np.ascontiguousarray(fn(tile_features, image_size, grid, newline), dtype=np.float32)


def merge_embeddings(text_embeds: np.ndarray, image_mask: np.ndarray, image_features: list[np.ndarray]) -> np.ndarray:
    """Write image features (in order) into the rows of `text_embeds` where `image_mask` is set."""
    feats = np.concatenate(image_features, axis=0) if image_features else np.zeros((0, text_embeds.shape[-1]))
    if int(image_mask.sum()) != len(feats):
        raise ValueError(f"prompt has {int(image_mask.sum())} image positions but {len(feats)} image features")
    out = text_embeds.copy()
    out[image_mask] = feats
    return out
