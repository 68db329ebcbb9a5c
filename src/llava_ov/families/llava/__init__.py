"""LLaVA-1.5 (LlavaForConditionalGeneration): one CLIP tile per image, features used as they are."""

MODEL_TYPE = "llava"  # config.json "model_type"
ARCHITECTURES = ("LlavaForConditionalGeneration",)  # config.json "architectures": the transformers classes this folder runs
