"""LLaVA-OneVision at conversion: the shared tower wrapper (SigLIP, last layer, all patches, projector), the
learned `image_newline` written into config.json, and the processor built without its video processor
(transformers' `LlavaOnevisionVideoProcessor` needs torchvision; our runtime preprocesses frames itself)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from llava_ov.families.llava_next.export import LlavaNextExport

PROCESSOR_SETTINGS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")


@lru_cache(maxsize=1)
def images_only_processor() -> type:
    """`LlavaOnevisionProcessor` without the video processor: the same prompt expansion for images, and
    saved under the real class name (so transformers with torchvision loads the export's processor)."""
    import transformers

    class LlavaOnevisionImagesProcessor(transformers.LlavaOnevisionProcessor):
        def __init__(
            self, image_processor: Any = None, tokenizer: Any = None, num_image_tokens: int | None = None,
            vision_feature_select_strategy: str | None = None, chat_template: str | None = None,
            image_token: str = "<image>", video_token: str = "<video>", vision_aspect_ratio: str = "anyres_max_9",
            **kwargs: Any,
        ):  # the processor's own settings named here: save_pretrained writes the ones __init__ names
            super().__init__(
                image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                num_image_tokens=num_image_tokens, vision_feature_select_strategy=vision_feature_select_strategy,
                chat_template=chat_template, image_token=image_token, video_token=video_token,
                vision_aspect_ratio=vision_aspect_ratio, **kwargs,
            )  # fmt: skip

        def to_dict(self) -> dict[str, Any]:
            return {**super().to_dict(), "processor_class": "LlavaOnevisionProcessor"}

    return LlavaOnevisionImagesProcessor


class LlavaOnevisionExport(LlavaNextExport):
    def load_processor(self, src: str, revision: str | None) -> Any:
        import transformers

        settings, _ = transformers.ProcessorMixin.get_processor_dict(src, revision=revision)
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, revision=revision)
        image_processor = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(src, revision=revision)
        template = settings.get("chat_template") or getattr(tokenizer, "chat_template", None)
        return images_only_processor()(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
            **{k: settings[k] for k in PROCESSOR_SETTINGS if k in settings},
        )  # fmt: skip

    def build_processor(self, preprocessor: dict[str, Any], tokenizer: Any, template: str, config: Any) -> Any:
        import transformers

        kwargs = {k: v for k, v in preprocessor.items() if k not in ("image_processor_type", "processor_class")}
        vision = config.vision_config
        return images_only_processor()(
            image_processor=transformers.LlavaOnevisionImageProcessorPil(**kwargs), tokenizer=tokenizer,
            chat_template=template, num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
        )  # fmt: skip


EXPORT = LlavaOnevisionExport(image_processor="LlavaOnevisionImageProcessorPil", processor="LlavaOnevisionProcessor")
