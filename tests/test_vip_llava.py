"""VipLlava: features from five tower layers (-2, -5, -8, -11, 6), concatenated, layer-normed and projected inside
the exported vision model; prompt ids and greedy tokens equal transformers' (tiny model from the 13B's config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from conftest import converted_pipeline
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from reference import hf_generate, hf_inputs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from llava_ov.exporting.random_models import RandomModelSpec, build_random_checkpoint

    # 12 tower layers: the feature layers reach back to -11
    return build_random_checkpoint(RandomModelSpec("vip-llava-13b-hf", vision_layers=12), tmp_path_factory.mktemp("vip"))


@pytest.fixture(scope="module")
def pipe(checkpoint, tmp_path_factory) -> Pipeline:
    return converted_pipeline(checkpoint, tmp_path_factory.mktemp("vip-ov") / "ov")


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
