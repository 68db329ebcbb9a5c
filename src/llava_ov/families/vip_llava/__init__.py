"""VipLlava (VipLlavaForConditionalGeneration): LLaVA-1.5's single CLIP tile, with features taken from several
tower layers (-2, -5, -8, -11, 6), concatenated, and a projector that layer-normalizes them first."""

MODEL_TYPE = "vipllava"  # config.json "model_type"
ARCHITECTURES = ("VipLlavaForConditionalGeneration",)  # config.json "architectures": the transformers classes this folder runs
