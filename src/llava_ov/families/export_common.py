"""Conversion hooks the LLaVA families share (torch and transformers imported lazily, at conversion only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_ov.families.base import TOWERS_WITHOUT_CLS


def vision_module(model: Any, project: bool = True) -> Any:
    """CLIP tower -> hidden state of vision_feature_layer(s) -> (drop CLS) -> projector (unless
    `project` is False: then the projector is a stage of its own), as one torch module."""
    import torch

    cfg = model.config
    layers = cfg.vision_feature_layer
    drop_cls = getattr(cfg, "vision_feature_select_strategy", "default") == "default"  # VipLlava: always dropped

    class VisionEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = model.model.vision_tower
            self.projector = model.model.multi_modal_projector if project else torch.nn.Identity()

        def forward(self, pixel_values):
            hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
            feats = hidden[layers] if isinstance(layers, int) else torch.cat([hidden[i] for i in layers], dim=-1)
            if drop_cls:
                feats = feats[:, 1:]
            return self.projector(feats)

    return VisionEmbeddings().eval()


@dataclass
class Stage:
    """A vision stage traced into a model of its own: the module, an example input, its input's name and shape."""

    module: Any
    example: Any
    input_name: str
    shape: list[int]


class LlavaExport:
    """How convert and the random test models handle one LLaVA family."""

    def __init__(self, image_processor: str, processor: str):
        self.image_processor = image_processor  # transformers class names
        self.processor = processor

    def vision_module(self, model: Any) -> Any:
        return vision_module(model)

    def stages(self, model: Any) -> dict[str, Stage]:
        """Vision stages exported beside the vision model (common.layout.STAGE_PARTS); none here."""
        return {}

    def load_processor(self, src: str, revision: str | None) -> Any:
        """The checkpoint's transformers processor (tokenizer, image processor, chat template)."""
        import transformers

        return transformers.AutoProcessor.from_pretrained(src, revision=revision)

    def config_extras(self, model: Any) -> dict[str, Any]:
        """Entries convert adds to config.json beside the model's own config."""
        return {}

    def build_processor(self, preprocessor: dict[str, Any], tokenizer: Any, template: str, config: Any) -> Any:
        """The transformers processor of a random test checkpoint, from its preprocessor_config.json."""
        import transformers

        kwargs = {k: v for k, v in preprocessor.items() if k not in ("image_processor_type", "processor_class")}
        named = preprocessor.get("image_processor_type")  # e.g. SiglipImageProcessor for a SigLIP tower
        image_class = getattr(transformers, f"{named}Pil", None) if named else None
        return getattr(transformers, self.processor)(
            image_processor=(image_class or getattr(transformers, self.image_processor))(**kwargs),
            tokenizer=tokenizer,
            chat_template=template,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=getattr(config, "vision_feature_select_strategy", "default"),
            num_additional_image_tokens=int(config.vision_config.model_type not in TOWERS_WITHOUT_CLS),  # the CLS token
        )
