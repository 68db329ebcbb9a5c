"""VipLlava at conversion: the shared CLIP-tower wrapper reads the list of feature layers (`vision_feature_layers`,
transformers' `vision_feature_layer`), drops each one's CLS, and ends with VipLlava's projector."""

from llava_ov.families.export_common import LlavaExport

EXPORT = LlavaExport(image_processor="CLIPImageProcessorPil", processor="LlavaProcessor")
