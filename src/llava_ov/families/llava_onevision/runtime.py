"""LLaVA-OneVision at run time: transformers' `LlavaOnevision*` image, video and packing steps in numpy.

- One image in the prompt: LLaVA-NeXT's anyres tiles (base image resized whole, grid from the 36
  `image_grid_pinpoints` up to 2304x2304, zero padding), packed as LLaVA-NeXT (unpad, `image_newline`
  after every row), except that a grid feature map larger than `anyres_max_N` tiles' worth is shrunk by
  bilinear interpolation first (`LlavaOnevisionModel.pack_image_features`).
- Several images in the prompt (transformers' `batch_num_images` > 1): each one is padded to a square
  with the mean colour, resized to the tile size and fed as one tile + `image_newline` (730 tokens).
- A video: each frame resized to the tile size, encoded, pooled 2x bilinearly (27x27 -> 14x14 = 196
  tokens), the frames in order and one `image_newline` at the end (`get_video_features`).

The image-token budget lowers a single image through reduced pinpoint lists, as for LLaVA-NeXT, and
finally to the square single-tile form the model uses for multi-image prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from llava_ov.families.base import LlavaConfigMapping
from llava_ov.families.llava_next.runtime import anyres_resolutions, preprocess_anyres, unpad_bounds
from llava_ov.runtime.budget import Resolution
from llava_ov.runtime.export import ImageConfig
from llava_ov.runtime.families import RunStage
from llava_ov.runtime.image import ProcessedImage, load_image, resize_crop, to_float

# "we sample a maximum of 32 frames per video" is LLaVA-OneVision's training setting (paper, section 4)
TRAINED_FRAMES = 32
SHRINK_ABOVE = 1.1  # pack_image_features interpolates only when the area ratio's square root exceeds this

# ----------------------------------------------------------------------------- bilinear resize (torch's)


def _bilinear_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of torch's bilinear interpolation along one axis (align_corners=False)."""
    scale = np.float32(size_in / size_out)
    source = np.maximum((np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    low = source.astype(np.int64)  # floor: source >= 0
    high = np.minimum(low + 1, size_in - 1)
    frac = (source - low).astype(np.float32)
    weights = np.zeros((size_out, size_in), np.float32)
    rows = np.arange(size_out)
    np.add.at(weights, (rows, low), 1 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def bilinear_resize(feature_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """[..., H, W, C] -> [..., height, width, C], as `torch.nn.functional.interpolate(mode="bilinear")`."""
    rows = _bilinear_weights(feature_map.shape[-3], height)
    cols = _bilinear_weights(feature_map.shape[-2], width)
    out = np.einsum("oh,...hwc->...owc", rows, feature_map.astype(np.float32, copy=False))
    return np.einsum("pw,...owc->...opc", cols, out)


# ----------------------------------------------------------------------------- sizes


def shrunk_size(height: int, width: int, side: int, max_tiles: int) -> tuple[int, int]:
    """The unpadded grid feature map's (height, width) after anyres_max_N's interpolation (if any)."""
    ratio = math.sqrt(height * width / (max_tiles * side**2))
    if ratio > SHRINK_ABOVE:
        return int(height // ratio), int(width // ratio)
    return height, width


def grid_map(side: int, image_size: tuple[int, int], grid: tuple[int, int], max_tiles: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Per position of the packed grid feature map (before the newline column): its tile (1..rows*cols,
    row-major; the nearest one where the map was shrunk), and the map's (height, width)."""
    rows, cols = grid
    tiles = (np.arange(rows)[:, None] * cols + np.arange(cols)[None, :] + 1).repeat(side, 0).repeat(side, 1)
    row_slice, col_slice = unpad_bounds(tiles.shape, image_size)
    tiles = tiles[row_slice, col_slice]
    height, width = shrunk_size(*tiles.shape, side, max_tiles)
    pick_rows = (np.arange(height) * tiles.shape[0]) // height
    pick_cols = (np.arange(width) * tiles.shape[1]) // width
    return tiles[np.ix_(pick_rows, pick_cols)], (height, width)


# ----------------------------------------------------------------------------- the family


class LlavaOnevision(LlavaConfigMapping):
    """LLaVA-OneVision: images (one: anyres_max_N; several: one square tile each) and pooled video frames."""

    model_type = "llava_onevision"
    architecture = "LlavaOnevisionForConditionalGeneration"
    takes_video = True
    default_frames = TRAINED_FRAMES

    def __init__(self, config: dict[str, Any], image: ImageConfig, video: ImageConfig | None = None):
        super().__init__(config, image, video)
        newline = config.get("image_newline")  # written into config.json by convert
        if newline is None:
            raise ValueError("config.json has no image_newline: convert the checkpoint with llava-ov convert")
        self.newline = np.asarray(newline, dtype=np.float32)
        self.max_tiles = int(str(config.get("vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
        vision = config.get("vision_config", {})
        self.side = int(vision.get("image_size", 384)) // int(vision.get("patch_size", 14))

    # ---------------------------------------------------------------- images

    def _packed_length(self, image_size: tuple[int, int], grid: tuple[int, int]) -> int:
        if grid[0] * grid[1] == 0:
            return self.tokens_per_tile + 1
        side = self.side
        rows, cols = unpad_bounds((grid[0] * side, grid[1] * side), image_size)
        height, width = shrunk_size(rows.stop - rows.start, cols.stop - cols.start, side, self.max_tiles)
        return self.tokens_per_tile + height * (width + 1)

    def resolutions(self, image_size: tuple[int, int], images_in_prompt: int = 1) -> list[Resolution]:
        square = Resolution((), self.tokens_per_tile + 1, (0, 0))
        if images_in_prompt > 1:
            return [square]  # transformers feeds each image of a multi-image prompt as one square tile
        return anyres_resolutions(
            self.image, image_size, lambda grid: self._packed_length(image_size, grid), square.tokens
        )

    def preprocess(self, image: Image.Image, resolution: Resolution) -> ProcessedImage:
        if resolution.pinpoints == ():
            return self._preprocess_square(image)
        pinpoints = resolution.pinpoints if resolution.pinpoints is not None else self.image.image_grid_pinpoints
        return preprocess_anyres(image, replace(self.image, image_grid_pinpoints=pinpoints))

    def _preprocess_square(self, image: Image.Image) -> ProcessedImage:
        """Padded to a square with the mean colour (centred), then resized to one tile (`pad_to_square`)."""
        img = load_image(image)
        h, w = img.height, img.width
        side = max(h, w)
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[:] = [int(m * 255) for m in self.image.image_mean]
        top, left = (side - h) // 2 if w > h else 0, (side - w) // 2 if h > w else 0
        canvas[top : top + h, left : left + w] = np.asarray(img)
        return ProcessedImage(to_float([resize_crop(canvas, self.image)], self.image), (h, w), (0, 0))

    def pack(self, tile_features: np.ndarray, processed: ProcessedImage) -> np.ndarray:
        """[1 + rows*cols, side*side, C] -> [N, C]: base tokens, then the unpadded (and shrunk) grid map
        with image_newline after each row; a single tile is followed by one image_newline."""
        base, tiles = tile_features[0], tile_features[1:]
        channels = tile_features.shape[-1]
        if len(tiles) == 0:
            return np.ascontiguousarray(np.concatenate([base, self.newline[None]]), dtype=np.float32)
        rows, cols = processed.grid
        side = self.side
        fmap = tiles.reshape(rows, cols, side, side, channels).transpose(0, 2, 1, 3, 4).reshape(rows * side, cols * side, channels)
        row_slice, col_slice = unpad_bounds(fmap.shape[:2], processed.image_size)
        fmap = fmap[row_slice, col_slice]
        height, width = shrunk_size(fmap.shape[0], fmap.shape[1], side, self.max_tiles)
        if (height, width) != fmap.shape[:2]:
            fmap = bilinear_resize(fmap, height, width)
        column = np.broadcast_to(self.newline, (height, 1, channels))
        grid_tokens = np.concatenate([fmap, column], axis=1).reshape(-1, channels)
        return np.ascontiguousarray(np.concatenate([base, grid_tokens]), dtype=np.float32)

    def packed_tiles(self, image_size: tuple[int, int], resolution: Resolution) -> np.ndarray:
        base = np.zeros(self.tokens_per_tile, np.int64)
        if resolution.grid[0] * resolution.grid[1] == 0:
            return np.concatenate([base, [-1]]).astype(np.int64)
        tiles, (height, _) = grid_map(self.side, image_size, resolution.grid, self.max_tiles)
        tiles = np.concatenate([tiles, np.full((height, 1), -1)], axis=1)
        return np.concatenate([base, tiles.reshape(-1)]).astype(np.int64)

    # ---------------------------------------------------------------- video

    @property
    def video_token_id(self) -> int:
        return int(self.config.get("video_token_index", self.config.get("video_token_id", 151647)))

    @property
    def tokens_per_frame(self) -> int:
        """ceil(side / 2)^2: 196 at 384/14 (`apply_pooling`)."""
        return math.ceil(self.side / 2) ** 2

    def preprocess_frames(self, frames: Sequence[Image.Image]) -> np.ndarray:
        return to_float([resize_crop(frame, self.video) for frame in frames], self.video)

    def encode_frames(self, run: RunStage, pixel_values: np.ndarray) -> np.ndarray:
        """Tower + projector per frame, then 2x bilinear pooling of each frame's feature map."""
        features = run("vision", pixel_values)
        pooled_side = math.ceil(self.side / 2)
        fmap = features.reshape(len(features), self.side, self.side, -1)
        return bilinear_resize(fmap, pooled_side, pooled_side).reshape(len(features), pooled_side**2, -1)

    def video_tiles(self, frames: int) -> np.ndarray:
        return np.concatenate([super().video_tiles(frames), [-1]]).astype(np.int64)

    def pack_frames(self, frame_features: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([*frame_features, self.newline[None]]).astype(np.float32, copy=False)


FAMILY = LlavaOnevision
