"""LLaVA-NeXT-Video (LlavaNextVideoForConditionalGeneration): LLaVA-NeXT's images plus pooled video frames.

Hub configs of llava-hf/LLaVA-NeXT-Video-7B-hf said `"model_type": "llava_next"` before a later commit
made it `llava_next_video`: the registry finds this folder by architecture, so both are taken."""

MODEL_TYPE = "llava_next_video"  # config.json "model_type"
ARCHITECTURES = ("LlavaNextVideoForConditionalGeneration",)  # config.json "architectures": the transformers classes this folder runs
