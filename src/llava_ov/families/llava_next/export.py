"""LLaVA-NeXT at conversion: the shared CLIP-tower wrapper, plus the learned `image_newline` written into config.json."""

from __future__ import annotations

from typing import Any

from llava_ov.families.export_common import LlavaExport


class LlavaNextExport(LlavaExport):
    def config_extras(self, model: Any) -> dict[str, Any]:
        """The packing's row separator, read from config.json by our runtime and by openvino_genai."""
        newline = getattr(model.model, "image_newline", None)
        return {} if newline is None else {"image_newline": newline.detach().float().cpu().tolist()}


EXPORT = LlavaNextExport(image_processor="LlavaNextImageProcessorPil", processor="LlavaNextProcessor")
