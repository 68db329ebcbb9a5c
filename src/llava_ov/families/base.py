"""What the LLaVA families share at run time: a CLIP-style tower whose config says how many tokens a tile makes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from llava_ov.runtime.export import ImageConfig
from llava_ov.runtime.families import RunStage, no_video


TOWERS_WITHOUT_CLS = ("siglip_vision_model", "siglip2_vision_model")  # vision_config model_types: patches only


class LlavaConfigMapping:
    """The config.json fields every LLaVA family reads the same way; images only, one vision model."""

    model_type = ""
    architecture = ""
    stages: tuple[str, ...] = ()  # vision stages exported as models of their own (common.layout.STAGE_PARTS)
    takes_video = False
    default_frames = 0

    def __init__(self, config: dict[str, Any], image: ImageConfig, video: ImageConfig | None = None):
        self.config = config
        self.image = image
        self.video = video or image

    @property
    def image_token_id(self) -> int:
        return int(self.config.get("image_token_index", self.config.get("image_token_id", 32000)))

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens per vision tile: (image_size / patch_size)^2 patches (576 for CLIP-L/336, 729 for
        SigLIP/384), + the CLS token of towers that have one, - the first token for the "default" strategy
        (transformers drops it whatever it is)."""
        vision = self.config.get("vision_config", {})
        patches = (int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14))) ** 2
        has_cls = vision.get("model_type", "clip_vision_model") not in TOWERS_WITHOUT_CLS
        return patches + int(has_cls) - int(self.config.get("vision_feature_select_strategy", "default") == "default")

    def encode_tiles(self, run: RunStage, pixel_values: np.ndarray) -> np.ndarray:
        """[tiles, 3, H, W] -> [tiles, tokens_per_tile, hidden]: the vision model holds tower and projector."""
        return run("vision", pixel_values)

    # ------------------------------------------------------------ video (families that take it override)

    @property
    def video_token_id(self) -> int | None:
        return None

    @property
    def tokens_per_frame(self) -> int:
        raise no_video(self.architecture)

    def preprocess_frames(self, frames: Sequence[Image.Image]) -> np.ndarray:
        raise no_video(self.architecture)

    def encode_frames(self, run: RunStage, pixel_values: np.ndarray) -> np.ndarray:
        raise no_video(self.architecture)

    def video_tiles(self, frames: int) -> np.ndarray:
        """Per packed video position: its frame (0..frames-1), or -1 for a separator token."""
        return np.repeat(np.arange(frames, dtype=np.int64), self.tokens_per_frame)

    def pack_frames(self, frame_features: Sequence[np.ndarray]) -> np.ndarray:
        """Per-frame features [tokens_per_frame, C] -> the video's [N, C] prompt tokens (frames in order)."""
        return np.concatenate(frame_features).astype(np.float32, copy=False)
