"""What the LLaVA families share at run time: a CLIP-style tower whose config says how many tokens a tile makes."""

from __future__ import annotations

from typing import Any

from llava_ov.runtime.export import ImageConfig


class LlavaConfigMapping:
    """The config.json fields every LLaVA family reads the same way."""

    model_type = ""
    architecture = ""

    def __init__(self, config: dict[str, Any], image: ImageConfig):
        self.config = config
        self.image = image

    @property
    def image_token_id(self) -> int:
        return int(self.config.get("image_token_index", self.config.get("image_token_id", 32000)))

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens per vision tile: (image_size / patch_size)^2 (576 for CLIP-L/336), + CLS if kept."""
        vision = self.config.get("vision_config", {})
        patches = (int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14))) ** 2
        return patches + int(self.config.get("vision_feature_select_strategy", "default") == "full")
