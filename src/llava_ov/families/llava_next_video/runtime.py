"""LLaVA-NeXT-Video at run time: LLaVA-NeXT's anyres images, and videos as pooled per-frame features.

The export splits the vision path as optimum-intel does (and openvino_genai loads it): "vision" is the
CLIP tower up to the selected layer (CLS dropped), "projector" the multi-modal projector, "resampler"
the spatial pooling (`spatial_pool_mode`, `spatial_pool_stride`). An image tile runs vision ->
projector; a frame runs vision -> resampler -> projector (`LlavaNextVideoModel.get_video_features`).

Frames are preprocessed as transformers' `LlavaNextVideoVideoProcessor` does, one frame at a time:
shortest edge resized (bicubic), center crop, rescale, CLIP normalization (the video processor's
settings, which fall back to the image processor's: 336/336 on the 7B).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from llava_ov.families.llava_next.runtime import LlavaNext
from llava_ov.runtime.export import ImageConfig
from llava_ov.runtime.families import RunStage
from llava_ov.runtime.image import resize_crop, to_float

TRAINED_FRAMES = 32  # "The videos were sampled uniformly to be 32 frames per clip" (the llava-hf model card)


class LlavaNextVideo(LlavaNext):
    """LLaVA-NeXT images + videos: <video> expands to frames x (side / stride)^2 pooled tokens."""

    model_type = "llava_next_video"
    architecture = "LlavaNextVideoForConditionalGeneration"
    stages = ("projector", "resampler")
    takes_video = True
    default_frames = TRAINED_FRAMES

    def __init__(self, config: dict[str, Any], image: ImageConfig, video: ImageConfig | None = None):
        super().__init__(config, image, video)
        self.pool_stride = int(config.get("spatial_pool_stride", 2))

    @property
    def video_token_id(self) -> int:
        return int(self.config.get("video_token_index", self.config.get("video_token_id", 32000)))

    @property
    def tokens_per_frame(self) -> int:
        """(crop side / patch / stride)^2: 144 for a 336 crop, patch 14, stride 2 (the processor's count)."""
        patch = int(self.config.get("vision_config", {}).get("patch_size", 14))
        height = self.video.crop_size.get("height") if self.video.do_center_crop else self.video.base_size[0]
        width = self.video.crop_size.get("width") if self.video.do_center_crop else self.video.base_size[1]
        return (height // patch // self.pool_stride) * (width // patch // self.pool_stride)

    def encode_tiles(self, run: RunStage, pixel_values: np.ndarray) -> np.ndarray:
        return run("projector", run("vision", pixel_values))

    def preprocess_frames(self, frames: Sequence[Image.Image]) -> np.ndarray:
        return to_float([resize_crop(frame, self.video) for frame in frames], self.video)

    def encode_frames(self, run: RunStage, pixel_values: np.ndarray) -> np.ndarray:
        return run("projector", run("resampler", run("vision", pixel_values)))


FAMILY = LlavaNextVideo
