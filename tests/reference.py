"""transformers reference runs shared by the tests (the only place tests call generate on HF models)."""

from __future__ import annotations

import torch
import transformers
from PIL import Image

from llava_ov.runtime.pipeline import Message


def hf_inputs(processor, messages: list[Message]):
    """Processor inputs for a conversation in our Message form (same template, same images)."""
    chat = [m.for_template() for m in messages]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    images = [Image.open(img).convert("RGB") if not isinstance(img, Image.Image) else img
              for m in messages for img in m.images]  # fmt: skip
    if images and isinstance(processor, transformers.LlavaOnevisionProcessor):
        images = [images]  # one conversation's images: OneVision feeds several at base resolution
    return processor(images=images or None, text=text, return_tensors="pt")


def hf_generate(model, processor, messages: list[Message], max_new_tokens: int = 32) -> list[int]:
    """Greedy tokens from transformers, without a trailing EOS."""
    inputs = hf_inputs(processor, messages)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    return tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


def hf_logprobs(model, processor, messages: list[Message], tokens: list[int]):
    """[len(tokens), vocab] log-softmax of transformers' logits before each of `tokens` (teacher-forced)."""
    inputs = hf_inputs(processor, messages)
    prompt = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits[0, prompt - 1 : prompt - 1 + len(tokens)].double()
    return torch.log_softmax(logits, dim=-1).numpy()
