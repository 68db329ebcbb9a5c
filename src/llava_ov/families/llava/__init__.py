"""LLaVA-1.5 (LlavaForConditionalGeneration): one CLIP tile per image, features used as they are."""
