"""LLaVA-1.5 at run time: CLIP preprocessing (shortest edge, center crop), one tile, no packing.

`preprocess_clip` equals transformers' `CLIPImageProcessorPil` bit for bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from llava_ov.families.base import LlavaConfigMapping
from llava_ov.runtime.budget import Resolution
from llava_ov.runtime.export import ImageConfig
from llava_ov.runtime.image import ImageSource, ProcessedImage, load_image, resize_crop, to_float


def preprocess_clip(image: ImageSource, cfg: ImageConfig) -> ProcessedImage:
    """LLaVA-1.5 / CLIP: shortest edge resized, then center crop; one tile."""
    img = load_image(image)
    return ProcessedImage(to_float([resize_crop(img, cfg)], cfg), (img.height, img.width), (1, 1))


def pack_single(tile_features: np.ndarray) -> np.ndarray:
    """The one tile's tokens, unchanged."""
    return np.ascontiguousarray(tile_features.reshape(-1, tile_features.shape[-1]), dtype=np.float32)


class Llava(LlavaConfigMapping):
    """LLaVA-1.5: a fixed number of tokens per image, nothing for a budget to reduce."""

    model_type = "llava"
    architecture = "LlavaForConditionalGeneration"

    def resolutions(self, image_size: tuple[int, int], images_in_prompt: int = 1) -> list[Resolution]:
        return [Resolution(None, self.tokens_per_tile, (1, 1))]

    def preprocess(self, image: Image.Image, resolution: Resolution) -> ProcessedImage:
        return preprocess_clip(image, self.image)

    def pack(self, tile_features: np.ndarray, processed: ProcessedImage) -> np.ndarray:
        return pack_single(tile_features)

    def packed_tiles(self, image_size: tuple[int, int], resolution: Resolution) -> np.ndarray:
        return np.zeros(self.tokens_per_tile, np.int64)


FAMILY = Llava
