"""LLaVA-NeXT (LlavaNextForConditionalGeneration): anyres tiles, packed with unpad + image_newline."""

MODEL_TYPE = "llava_next"  # config.json "model_type"
ARCHITECTURES = ("LlavaNextForConditionalGeneration",)  # config.json "architectures": the transformers classes this folder runs
