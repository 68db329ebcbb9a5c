"""openvino_genai.VLMPipeline on our exports: an independent second implementation to agree with.

genai inserts the newline after the image tokens itself, so it gets the
rendered prompt with "<image>" instead of "<image>\\n"; its own chat-template
step is off (it would pass message content as a string, which LLaVA templates
do not render).
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest
from PIL import Image

from conftest import F32
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from reference import hf_generate, hf_inputs

og = pytest.importorskip("openvino_genai")


class TokenCollector(og.StreamerBase):
    def __init__(self):
        super().__init__()
        self.tokens: list[int] = []

    def write(self, token):
        self.tokens += token if isinstance(token, list) else [token]
        return og.StreamingStatus.RUNNING

    def end(self):
        pass


@pytest.fixture(scope="module")
def genai_pipes(exports):
    return {fam: og.VLMPipeline(str(path), "CPU", ATTENTION_BACKEND="SDPA", **F32) for fam, path in exports.items()}


def genai_tokens(vlm, prompt: str, image_path, max_new_tokens: int = 32) -> list[int]:
    cfg = og.GenerationConfig()
    cfg.max_new_tokens, cfg.do_sample, cfg.apply_chat_template = max_new_tokens, False, False
    pixels = np.array(Image.open(image_path).convert("RGB"))
    collector = TokenCollector()
    vlm.generate(prompt.replace("<image>\n", "<image>"), images=[ov.Tensor(pixels[None])],
                 generation_config=cfg, streamer=collector)  # fmt: skip
    return collector.tokens


@pytest.fixture(scope="module")
def renderers(exports):
    return {fam: Pipeline(path, properties=F32, cache_dir=None) for fam, path in exports.items()}


@pytest.mark.parametrize("family", ["llava-next", "llava"])
@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "rocket"])
def test_genai_greedy_tokens_equal_transformers(family, photo, genai_pipes, renderers, hf_models, photos):
    messages = [Message("user", "Describe this image.", [photos[photo]])]
    ref = hf_generate(*hf_models[family], messages)
    assert genai_tokens(genai_pipes[family], renderers[family].render(messages), photos[photo]) == ref


@pytest.fixture
def small_photo(tmp_path, photos):
    path = tmp_path / "small.png"
    Image.open(photos["chelsea"]).convert("RGB").resize((300, 200)).save(path)
    return path


@pytest.mark.xfail(
    strict=True,
    reason="openvino_genai's llava_next anyres reads image_grid_pinpoints as (width, height) where transformers "
    "reads (height, width); for images with both sides <= 336 (ties) it builds another grid and expands this "
    "300x200 image to 990 prompt tokens instead of transformers' 1478, so answers differ from the first token. "
    "No upstream issue found; ours follows transformers (test_pipeline checks prompt ids and tokens).",
)
def test_genai_equals_transformers_on_small_image(genai_pipes, renderers, hf_models, small_photo):
    messages = [Message("user", "Describe this image.", [small_photo])]
    model, processor = hf_models["llava-next"]
    expected_prompt = hf_inputs(processor, messages)["input_ids"].shape[1]
    cfg = og.GenerationConfig()
    cfg.max_new_tokens, cfg.do_sample, cfg.apply_chat_template = 1, False, False
    pixels = np.array(Image.open(small_photo).convert("RGB"))
    prompt = renderers["llava-next"].render(messages).replace("<image>\n", "<image>")
    result = genai_pipes["llava-next"].generate(prompt, images=[ov.Tensor(pixels[None])], generation_config=cfg)
    assert result.perf_metrics.get_num_input_tokens() == expected_prompt  # the stage where they part: packing
    ref = hf_generate(model, processor, messages)
    assert genai_tokens(genai_pipes["llava-next"], renderers["llava-next"].render(messages), small_photo) == ref


# ----------------------------------------------------------------------------- LLaVA-NeXT-Video


@pytest.fixture(scope="module")
def video_pipes(video_export):
    return og.VLMPipeline(str(video_export), "CPU", **F32), Pipeline(video_export, properties=F32, cache_dir=None)


def test_genai_loads_our_next_video_export_and_agrees_on_images(video_pipes, photos):
    genai, ours = video_pipes
    image = Image.open(photos["chelsea"]).convert("RGB")
    cfg = og.GenerationConfig()
    cfg.max_new_tokens = 12
    theirs = genai.generate("Describe the image.", images=[ov.Tensor(np.asarray(image)[None])], generation_config=cfg)
    assert theirs.texts[0] == ours.generate("Describe the image.", [image], GenerationConfig(max_new_tokens=12)).text


def test_genai_agrees_on_videos_whose_frames_need_no_resize(video_pipes, photos):
    """336x336 frames: both feed the same pixels. (Frames of other sizes differ from the first resized pixel:
    genai resizes frames its own way, ours as transformers' processor does; docs/video.md.)"""
    genai, ours = video_pipes
    photo = Image.open(photos["astronaut"]).convert("RGB")
    frames = [photo.crop((16 * i, 8 * i, 16 * i + 336, 8 * i + 336)) for i in range(8)]
    cfg = og.GenerationConfig()
    cfg.max_new_tokens = 24
    video = ov.Tensor(np.stack([np.asarray(f) for f in frames]))
    theirs = genai.generate("What happens in this video?", videos=[video], generation_config=cfg)
    mine = ours.generate("What happens in this video?", config=GenerationConfig(max_new_tokens=24, num_frames=8),
                         videos=[frames])  # fmt: skip
    assert theirs.texts[0] == mine.text and len(mine.token_ids) == 24
