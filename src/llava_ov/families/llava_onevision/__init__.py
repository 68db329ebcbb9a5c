"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): SigLIP tower, Qwen2 language model, anyres_max_9
tiling with feature interpolation, several images at base resolution, and videos as pooled frames."""

MODEL_TYPE = "llava_onevision"  # config.json "model_type"
ARCHITECTURES = ("LlavaOnevisionForConditionalGeneration",)  # config.json "architectures": the transformers classes this folder runs
