"""VipLlava at run time: LLaVA-1.5's preprocessing and token count (the several feature layers are
concatenated per patch, inside the exported vision model)."""

from __future__ import annotations

from llava_ov.families.llava.runtime import Llava


class VipLlava(Llava):
    model_type = "vipllava"
    architecture = "VipLlavaForConditionalGeneration"


FAMILY = VipLlava
