"""LLaVA-1.5 at conversion: the shared CLIP-tower wrapper, CLIP image processor, nothing added to config.json."""

from llava_ov.families.export_common import LlavaExport

EXPORT = LlavaExport(image_processor="CLIPImageProcessorPil", processor="LlavaProcessor")
