"""VipLlava: features from five tower layers (-2, -5, -8, -11, 6), concatenated, layer-normed and projected inside
the exported vision model; prompt ids and greedy tokens equal transformers' (tiny model from the 13B's config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from conftest import F32
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from reference import hf_generate, hf_inputs


@pytest.fixture(scope="module")
def checkpoint(matrix_model) -> Path:
    return matrix_model("vip-llava-13b-hf")[0]  # 12 tower layers: the feature layers reach back to -11


@pytest.fixture(scope="module")
def pipe(matrix_model) -> Pipeline:
    return Pipeline(matrix_model("vip-llava-13b-hf")[1], properties=F32, cache_dir=None)


def test_vip_llava_answers_as_transformers(pipe, checkpoint, photos):
    model = transformers.VipLlavaForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    assert list(model.config.vision_feature_layer) == [-2, -5, -8, -11, 6]
    image = Image.open(photos["chelsea"]).convert("RGB")
    messages = [Message("user", "What is in this picture?", [image])]
    ours = pipe.generate(messages, config=GenerationConfig(max_new_tokens=16))
    assert pipe.model.family.model_type == "vipllava" and ours.image_tokens == 576
    assert ours.prompt_tokens == hf_inputs(processor, messages)["input_ids"].shape[1]
    ref = hf_generate(model, processor, messages, max_new_tokens=16)
    assert ours.token_ids[: len(ref)] == ref and len(ref) > 0
    with torch.no_grad():
        pixels = hf_inputs(processor, messages)["pixel_values"]
        expected = model.get_image_features(pixels).pooler_output[0].numpy()
    features = pipe.model.encode_image_tiles(pixels.numpy())[0]
    assert abs(features - expected).max() < 1e-3
