"""A LLaVA (1.5 architecture) checkpoint with a SigLIP tower at 384x384: sizes, means and the token count come
from the checkpoint, never CLIP's defaults (before, every image request failed: the runtime fed 224x224)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from conftest import converted_pipeline
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from reference import hf_generate


def siglip_llava(out: Path) -> Path:
    """Tiny random LlavaForConditionalGeneration: SigLIP 384/14 tower (no CLS, "full" strategy, last layer),
    Llama text model, the Mistral vocabulary with <image>/<pad>, SiglipImageProcessor settings."""
    from llava_ov.exporting.random_models import RANDOM_WEIGHTS_MARKER, build_tokenizer, chat_template

    vision = transformers.SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2, num_hidden_layers=3)  # fmt: skip
    text = transformers.LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, num_hidden_layers=2, initializer_range=0.3)  # fmt: skip
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                                      image_seq_length=729, initializer_range=0.3)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(config).eval().save_pretrained(out)
    images = transformers.SiglipImageProcessorPil(size={"height": 384, "width": 384}, resample=3,
                                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    processor = transformers.LlavaProcessor(
        image_processor=images, tokenizer=build_tokenizer(None, "llava-1.5-7b-hf"),
        chat_template=chat_template("llava-1.5-7b-hf"), patch_size=14, vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
    )  # fmt: skip
    processor.save_pretrained(out)
    settings = {**images.to_dict(), "image_processor_type": "SiglipImageProcessor"}  # as the Hub's files say
    (out / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
    (out / RANDOM_WEIGHTS_MARKER).write_text("This checkpoint has random weights: its answers are noise.\n")
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return siglip_llava(tmp_path_factory.mktemp("siglip") / "ckpt")


@pytest.fixture(scope="module")
def pipe(checkpoint, tmp_path_factory) -> Pipeline:
    return converted_pipeline(checkpoint, tmp_path_factory.mktemp("siglip") / "ov")


def test_siglip_llava_answers_as_transformers(pipe, checkpoint, photos):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    processor = transformers.LlavaProcessor(
        image_processor=transformers.SiglipImageProcessorPil.from_pretrained(checkpoint),
        tokenizer=transformers.AutoTokenizer.from_pretrained(checkpoint),
        chat_template=(checkpoint / "chat_template.jinja").read_text(), patch_size=14,
        vision_feature_select_strategy="full", num_additional_image_tokens=0,
    )  # fmt: skip
    image = Image.open(photos["rocket"]).convert("RGB")  # not square: resized to 384x384, nothing cropped
    messages = [Message("user", "What is in this picture?", [image])]
    ours = pipe.generate(messages, config=GenerationConfig(max_new_tokens=16))
    assert ours.image_tokens == 729  # SigLIP has no CLS token: 27 x 27 patches
    ref = hf_generate(model, processor, messages, max_new_tokens=16)
    assert ours.token_ids[: len(ref)] == ref and len(ref) > 0
    pixels = pipe.model.family.preprocess(image, pipe.model.family.resolutions((image.height, image.width))[0])
    expected = processor.image_processor(image, return_tensors="np")["pixel_values"]
    assert pixels.pixel_values.shape == expected.shape == (1, 3, 384, 384)
    assert (pixels.pixel_values == expected).all()
