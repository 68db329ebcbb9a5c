"""LLaVA-NeXT-Video: detection, conversion, and image and video answers equal to transformers'.

transformers' video processor needs torchvision (no CPU wheel here), so the reference frames are made
with its algorithm per frame (CLIPImageProcessorPil: shortest edge, center crop, rescale, normalize)
and fed to transformers' model as `pixel_values_videos` directly; the `<video>` expansion uses
LlavaNextVideoProcessor.replace_video_token itself."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import F32
from llava_ov.runtime.families import family_for
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline

ARCH = "LlavaNextVideoForConditionalGeneration"


@pytest.fixture(scope="module")
def pipe(video_export):
    return Pipeline(video_export, properties=F32, cache_dir=None)


@pytest.fixture(scope="module")
def hf_model(video_checkpoint):
    return transformers.LlavaNextVideoForConditionalGeneration.from_pretrained(video_checkpoint, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def frames(photos) -> list[Image.Image]:
    """8 frames of a pan across a real photo (320x240: the resize and the crop both act)."""
    photo = Image.open(photos["astronaut"]).convert("RGB")
    return [photo.crop((16 * i, 8 * i, 16 * i + 320, 8 * i + 240)) for i in range(8)]


def clip_frames(export, frames) -> np.ndarray:
    """The video processor's per-frame steps with transformers' own PIL image processor."""
    pre = json.loads((export / "preprocessor_config.json").read_text())
    proc = transformers.CLIPImageProcessorPil(
        size=pre["size"], crop_size=pre["crop_size"], resample=pre["resample"],
        image_mean=pre["image_mean"], image_std=pre["image_std"],
    )  # fmt: skip
    return np.stack([proc(f, return_tensors="np")["pixel_values"][0] for f in frames])


def hf_video_ids(checkpoint, text: str, n_frames: int, height: int) -> torch.Tensor:
    """The prompt ids transformers' processor makes: its template, its tokenizer, <video> expanded by its rule."""
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    template = (checkpoint / "chat_template.jinja").read_text()
    chat = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "video"}]}]
    prompt = tok.apply_chat_template(chat, chat_template=template, add_generation_prompt=True, tokenize=False)
    me = SimpleNamespace(patch_size=14, video_token="<video>")
    video = np.zeros((n_frames, height, height, 3), np.uint8)
    expanded = transformers.LlavaNextVideoProcessor.replace_video_token(me, {"pixel_values_videos": [video]}, 0)
    return tok(prompt.replace("<video>", expanded), return_tensors="pt").input_ids


def greedy(model, max_new_tokens=12, **inputs) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


# ----------------------------------------------------------------------------- detection and conversion


@pytest.mark.parametrize("model_type", ["llava_next", "llava_next_video"])
def test_found_by_architecture_whatever_the_model_type_says(model_type):
    """Older Hub revisions of LLaVA-NeXT-Video-7B-hf say model_type llava_next; newer ones llava_next_video."""
    entry = family_for({"architectures": [ARCH], "model_type": model_type})
    assert entry.package == "llava_ov.families.llava_next_video"


def test_export_holds_the_three_vision_stages(video_export):
    for name in ("openvino_vision_embeddings_model.xml", "openvino_multi_modal_projector_model.xml",
                 "openvino_vision_resampler_model.xml"):  # fmt: skip
        assert (video_export / name).is_file()
    assert json.loads((video_export / "config.json").read_text())["model_type"] == "llava_next_video"


def test_old_hub_config_converts(video_checkpoint, tmp_path):
    """A checkpoint whose config.json says model_type "llava_next" (the Hub's first revisions) converts
    (AutoProcessor would need torchvision for it: the family builds its processor without the video one)."""
    from llava_ov.exporting.convert import ConvertOptions, convert

    ckpt = tmp_path / "ckpt"
    shutil.copytree(video_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llava_next"}))
    out = convert(str(ckpt), tmp_path / "ov", ConvertOptions(weight_format="fp32", show_progress=False))
    assert (out / "openvino_vision_resampler_model.xml").is_file()


# ----------------------------------------------------------------------------- exactness


def test_frames_preprocessed_as_transformers(pipe, video_export, frames):
    ours = pipe.model.family.preprocess_frames(frames)
    np.testing.assert_array_equal(ours, clip_frames(video_export, frames))


def test_video_features_equal_transformers(pipe, hf_model, video_export, frames):
    pixels = clip_frames(video_export, frames)
    ours = pipe.model.encode_frames(pixels)
    with torch.no_grad():
        ref = hf_model.get_video_features(torch.from_numpy(pixels)[None]).pooler_output[0].numpy()
    assert ours.shape == (8, 144, ref.shape[-1])
    np.testing.assert_allclose(ours.reshape(-1, ref.shape[-1]), ref, atol=2e-4, rtol=1e-4)


def test_video_answer_equals_transformers(pipe, hf_model, video_checkpoint, video_export, frames):
    text = "What happens in this video?"
    config = GenerationConfig(max_new_tokens=12, num_frames=8)
    ours = pipe.generate(text, config=config, videos=[frames])
    ids = hf_video_ids(video_checkpoint, text, 8, 336)
    pixels = torch.from_numpy(clip_frames(video_export, frames))[None]
    ref = greedy(hf_model, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels)
    assert ours.prompt_tokens == ids.shape[1]
    assert (ours.video_tokens, ours.video_frames) == (8 * 144, 8)
    assert ours.token_ids[: len(ref)] == ref and len(ref) > 0


def test_image_answer_equals_transformers(pipe, hf_model, video_checkpoint, photos):
    """The same model's image path: LLaVA-NeXT anyres through tower -> projector."""
    image = Image.open(photos["chelsea"]).convert("RGB")
    text = "Describe the image."
    ours = pipe.generate(text, [image], GenerationConfig(max_new_tokens=12))
    tok = transformers.AutoTokenizer.from_pretrained(video_checkpoint)
    proc = transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessorPil.from_pretrained(video_checkpoint), tokenizer=tok,
        patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=(video_checkpoint / "chat_template.jinja").read_text(),
    )  # fmt: skip
    chat = [Message("user", text, [image]).for_template()]
    inputs = proc(images=[image], text=proc.apply_chat_template(chat, add_generation_prompt=True), return_tensors="pt")
    ref = greedy(hf_model, **inputs)
    assert ours.prompt_tokens == inputs["input_ids"].shape[1]
    assert ours.token_ids[: len(ref)] == ref and len(ref) > 0


def test_image_and_video_in_one_prompt_keep_their_order(pipe, frames, photos):
    """The template renders images before videos; each placeholder gets its own features."""
    image = Image.open(photos["coffee"]).convert("RGB")
    prompt = pipe.prepare([Message("user", "Compare.", [image], [frames[:4]])], GenerationConfig(num_frames=4))
    kinds = [im.kind for im in prompt.images]
    assert kinds == ["image", "video"]
    video_at = np.flatnonzero(prompt.token_ids == pipe.model.family.video_token_id)
    image_at = np.flatnonzero(prompt.token_ids == pipe.model.image_token_id)
    assert len(video_at) == 4 * 144 and image_at.max() < video_at.min()


# ----------------------------------------------------------------------------- the engine's features on video


def test_prefix_cache_keys_a_video_by_content_and_sampling(pipe, frames):
    pipe.clear_caches()
    config = GenerationConfig(max_new_tokens=4, num_frames=4)
    first = pipe.generate("Describe.", config=config, videos=[frames])
    again = pipe.generate("Describe.", config=config, videos=[list(frames)])  # the same frames, another list
    assert again.token_ids == first.token_ids and again.cached_tokens >= 4 * 144  # the video's KV blocks reused
    other = pipe.generate("Describe.", config=GenerationConfig(max_new_tokens=4, num_frames=2), videos=[frames])
    assert other.cached_tokens < 144  # another sampling is another video: only the text before it is shared


def test_frame_features_are_cached_per_frame(pipe, frames, monkeypatch):
    """Frames 0, 2, 4, 6 of 8 are what a 4-frame sampling takes: encoded once, with the 8-frame request."""
    pipe.clear_caches()
    encoded = []
    encode = pipe.model.encode_frames
    monkeypatch.setattr(pipe.model, "encode_frames", lambda px: encoded.append(len(px)) or encode(px))
    pipe.prepare([Message("user", "x", videos=[frames])], GenerationConfig(num_frames=8))
    pipe.prepare([Message("user", "y", videos=[frames])], GenerationConfig(num_frames=4))
    assert encoded == [8]


def test_budget_lowers_frames_first(pipe, frames):
    prompt = pipe.prepare([Message("user", "x", videos=[frames])], GenerationConfig(num_frames=8, max_image_tokens=3 * 144))
    assert prompt.video_frames == 3 and prompt.video_tokens == 3 * 144


def test_default_frame_count_fits_the_context(pipe, photos):
    """32 frames (the model's own count) would be 4,608 tokens: over this model's 4,096; fewer are taken."""
    photo = Image.open(photos["coffee"]).convert("RGB")
    many = [photo.rotate(i) for i in range(40)]
    config = GenerationConfig(max_new_tokens=100)
    prompt = pipe.prepare([Message("user", "x", videos=[many])], config)
    assert prompt.video_frames < 32 and len(prompt.token_ids) + 100 <= pipe.model.max_context
    assert prompt.video_frames == (pipe.model.max_context - 1 - (len(prompt.token_ids) - prompt.video_tokens) - 100) // 144
    with pytest.raises(Exception, match="tokens"):  # an explicit count is taken as asked: too long is an error
        pipe.prepare([Message("user", "x", videos=[many])], GenerationConfig(num_frames=32))


def test_pruning_applies_across_frames(pipe, frames):
    from llava_ov.runtime.pruning import kept_count

    config = GenerationConfig(max_new_tokens=4, num_frames=4, visual_token_pruning=0.5)
    result = pipe.generate("Describe.", config=config, videos=[frames])
    assert result.video_tokens == kept_count(4 * 144, 0.5) and result.token_ids


def test_cancel_stops_a_long_video_before_its_frames_are_all_encoded(pipe, photos, monkeypatch):
    import threading
    import time

    from llava_ov.runtime.video import VideoCancelled

    pipe.clear_caches()
    photo = Image.open(photos["rocket"]).convert("RGB")
    many = [photo.rotate(i / 3) for i in range(24)]
    batches = []
    encode = pipe.model.encode_frames

    def slow(px):
        batches.append(len(px))
        time.sleep(0.3)
        return encode(px)

    monkeypatch.setattr(pipe.model, "encode_frames", slow)
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    started = time.perf_counter()
    with pytest.raises(VideoCancelled):
        pipe.submit("x", config=GenerationConfig(num_frames=24), cancel=cancel, videos=[many])
    assert time.perf_counter() - started < 1.5 and len(batches) < 3


def test_stateful_backend_answers_a_video_as_the_engine_does(video_export, pipe, frames):
    """--kv-cache stateful (NPU's default) takes the same prepared video prompt."""
    stateful = Pipeline(video_export, properties=F32, cache_dir=None, kv_cache="stateful")
    config = GenerationConfig(max_new_tokens=8, num_frames=4)
    try:
        assert stateful.generate("Describe.", config=config, videos=[frames]).token_ids == pipe.generate(
            "Describe.", config=config, videos=[frames]).token_ids
    finally:
        stateful.close()
