"""LLaVA-NeXT-Video at conversion: the tower, projector and resampler as three models (optimum-intel's
layout, which openvino_genai loads), LLaVA-NeXT's `image_newline`, and a processor built without
transformers' video processor (it needs torchvision; our runtime preprocesses frames itself)."""

from __future__ import annotations

from typing import Any

from llava_ov.families.export_common import Stage, vision_module
from llava_ov.families.llava_next.export import LlavaNextExport


class LlavaNextVideoExport(LlavaNextExport):
    def vision_module(self, model: Any) -> Any:
        return vision_module(model, project=False)

    def stages(self, model: Any) -> dict[str, Stage]:
        """The projector ([N, T, C_vision] -> [N, T, hidden]) and the spatial pooling ([N, T, C] -> [N, T / s^2, C])."""
        import torch

        vision = model.config.vision_config
        channels = vision.hidden_size * (1 if isinstance(model.config.vision_feature_layer, int) else len(model.config.vision_feature_layer))
        side = vision.image_size // vision.patch_size
        return {
            "projector": Stage(model.model.multi_modal_projector.eval(), torch.randn(2, 5, channels), "image_features", [-1, -1, channels]),
            "resampler": Stage(model.model.vision_resampler.eval(), torch.randn(2, side * side, channels), "image_features", [-1, side * side, channels]),
        }  # fmt: skip

    def load_processor(self, src: str, revision: str | None) -> Any:
        """LLaVA-NeXT's processor with this checkpoint's tokenizer, image processor and chat template:
        transformers' LlavaNextVideoProcessor cannot be built without torchvision."""
        import transformers

        settings, _ = transformers.ProcessorMixin.get_processor_dict(src, revision=revision)
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, revision=revision)
        image_processor = transformers.LlavaNextImageProcessorPil.from_pretrained(src, revision=revision)
        config = transformers.AutoConfig.from_pretrained(src, revision=revision)
        return transformers.LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer,
            chat_template=settings.get("chat_template") or getattr(tokenizer, "chat_template", None),
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
        )  # fmt: skip


EXPORT = LlavaNextVideoExport(image_processor="LlavaNextImageProcessorPil", processor="LlavaNextProcessor")
