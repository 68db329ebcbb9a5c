"""LLaVA-NeXT (LlavaNextForConditionalGeneration): anyres tiles, packed with unpad + image_newline."""
