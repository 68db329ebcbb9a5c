"""LLaVA-OneVision: anyres_max_9 prompt ids and features for several aspect ratios, several images, video,
budget and pruning, each against transformers (tiny random model from llava-onevision-qwen2-0.5b-ov-hf's
config, the real Qwen2 vocabulary; f32 pins).

transformers' video processor needs torchvision (no CPU wheel here): the reference frames are checked per
frame against the image processor's base tile (the same resize + normalize) and fed to transformers'
model as `pixel_values_videos`; the `<video>` expansion uses the processor's own count."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import F32
from llava_ov.families.llava_onevision.export import EXPORT
from llava_ov.families.llava_onevision.runtime import bilinear_resize
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from reference import hf_generate, hf_inputs

CONFIG_NAME = "llava-onevision-qwen2-0.5b-ov-hf"
# (width, height): square, wide, tall, extreme strips, and two that the anyres_max_9 interpolation shrinks
SIZES = [(384, 384), (500, 300), (200, 1000), (3000, 100), (1300, 900), (2000, 1500)]


@pytest.fixture(scope="module")
def checkpoint(matrix_model) -> Path:
    return matrix_model(CONFIG_NAME)[0]


@pytest.fixture(scope="module")
def pipe(matrix_model) -> Pipeline:
    return Pipeline(matrix_model(CONFIG_NAME)[1], properties=F32, cache_dir=None)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def processor(checkpoint):
    """transformers' LlavaOnevisionProcessor (less its torchvision-only video processor) from the checkpoint."""
    return EXPORT.load_processor(str(checkpoint), None)


@pytest.fixture(scope="module")
def photo(photos) -> Image.Image:
    return Image.open(photos["astronaut"]).convert("RGB")


def ask(images, text: str = "What is in this picture?") -> list[Message]:
    return [Message("user", text, list(images))]


# ----------------------------------------------------------------------------- images


def test_the_checkpoint_is_onevision_on_qwen2(pipe):
    described = pipe.info()["model"]
    assert pipe.model.family.model_type == "llava_onevision"
    assert (described["vision_tower"], described["language_model"]) == ("siglip_vision_model", "qwen2")
    assert pipe.model.family.tokens_per_tile == 729 and pipe.model.image_token_id == 151646


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_prompt_ids_and_features_equal_transformers(pipe, hf_model, processor, photo, size):
    image = photo.resize(size)
    messages = ask([image])
    ours = pipe.prepare(messages)
    ref = hf_inputs(processor, messages)
    assert ours.token_ids.tolist() == ref["input_ids"][0].tolist()
    with torch.no_grad():
        expected = hf_model.model.get_image_features(ref["pixel_values"], ref["image_sizes"]).pooler_output[0].numpy()
    assert ours.images[0].features.shape == expected.shape
    assert abs(ours.images[0].features - expected).max() < 1e-3
    assert len(pipe.model.family.packed_tiles((image.height, image.width), pipe.model.family.resolutions((image.height, image.width))[0])) == len(expected)


def test_pixels_equal_transformers(pipe, processor, photo):
    for size in SIZES[:3]:
        image = photo.resize(size)
        family = pipe.model.family
        ours = family.preprocess(image, family.resolutions((image.height, image.width))[0]).pixel_values
        ref = processor.image_processor(image, return_tensors="np")["pixel_values"][0]
        assert ours.shape == ref.shape and (ours == ref).all()


def test_answer_equals_transformers(pipe, hf_model, processor, photo):
    messages = ask([photo.resize((640, 420))])
    ours = pipe.generate(messages, config=GenerationConfig(max_new_tokens=16))
    ref = hf_generate(hf_model, processor, messages, max_new_tokens=16)
    assert ours.token_ids[: len(ref)] == ref and len(ref) > 0


def test_several_images_are_square_tiles_as_transformers(pipe, hf_model, processor, photo, photos):
    """batch_num_images > 1: each image padded to a square with the mean colour, one tile + image_newline."""
    other = Image.open(photos["coffee"]).convert("RGB").resize((200, 500))
    messages = ask([photo.resize((640, 420)), other], "Compare the two pictures.")
    ours = pipe.generate(messages, config=GenerationConfig(max_new_tokens=16))
    ref_ids = hf_inputs(processor, messages)["input_ids"]
    assert ours.prompt_tokens == ref_ids.shape[1] and ours.image_tokens == 2 * 730
    ref = hf_generate(hf_model, processor, messages, max_new_tokens=16)
    assert ours.token_ids[: len(ref)] == ref and len(ref) > 0


def test_a_chat_with_images_in_two_turns_counts_as_several_images(pipe, processor, photo, photos):
    other = Image.open(photos["rocket"]).convert("RGB")
    messages = [Message("user", "What is this?", [photo]), Message("assistant", "A person."),
                Message("user", "And this?", [other])]  # fmt: skip
    assert pipe.prepare(messages).token_ids.tolist() == hf_inputs(processor, messages)["input_ids"][0].tolist()


def test_budget_lowers_an_image_through_fewer_tiles_to_one_square_tile(pipe, photo):
    image = photo.resize((1300, 900))
    options = pipe.model.family.resolutions((image.height, image.width))
    assert options[0].tokens > options[1].tokens and options[-1].tokens == 730 and options[-1].pinpoints == ()
    for budget in (options[1].tokens, 730):
        prompt = pipe.prepare(ask([image]), GenerationConfig(max_image_tokens=budget))
        assert prompt.image_tokens <= budget


def test_a_budgeted_image_equals_transformers_with_the_reduced_pinpoints(pipe, hf_model, processor, photo):
    image = photo.resize((1300, 900))
    option = pipe.model.family.resolutions((image.height, image.width))[1]
    prompt = pipe.prepare(ask([image]), GenerationConfig(max_image_tokens=option.tokens))
    reduced = [list(p) for p in option.pinpoints]
    narrow = copy.deepcopy(processor)
    narrow.image_processor.image_grid_pinpoints = reduced
    ref = hf_inputs(narrow, ask([image]))
    hf_model.config.image_grid_pinpoints, saved = reduced, hf_model.config.image_grid_pinpoints
    try:
        with torch.no_grad():
            expected = hf_model.model.get_image_features(ref["pixel_values"], ref["image_sizes"]).pooler_output[0].numpy()
    finally:
        hf_model.config.image_grid_pinpoints = saved
    assert prompt.token_ids.tolist() == ref["input_ids"][0].tolist()
    assert abs(prompt.images[0].features - expected).max() < 1e-3


def test_pruning_keeps_every_newline(pipe, photo):
    from llava_ov.runtime.pruning import kept_count

    image = photo.resize((1300, 900))
    full = pipe.prepare(ask([image]))
    tiles = pipe.model.family.packed_tiles((image.height, image.width), pipe.model.family.resolutions((image.height, image.width))[0])
    newlines = int((tiles < 0).sum())
    result = pipe.generate(ask([image]), config=GenerationConfig(max_new_tokens=4, visual_token_pruning=0.5))
    assert result.image_tokens == newlines + kept_count(full.image_tokens - newlines, 0.5) and result.token_ids


def test_bilinear_resize_equals_torch():
    rng = np.random.default_rng(0)
    for shape, out in [((27, 27, 5), (14, 14)), ((108, 162, 3), (40, 61)), ((9, 40, 2), (3, 13))]:
        x = rng.standard_normal(shape).astype(np.float32)
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], list(out), mode="bilinear")
        assert abs(bilinear_resize(x, *out) - ref[0].permute(1, 2, 0).numpy()).max() < 1e-5


# ----------------------------------------------------------------------------- video


def hf_video_ids(processor, text: str, frames: int) -> torch.Tensor:
    """The processor's prompt: its template, its tokenizer, <video> expanded by its own rule."""
    chat = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "video"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    me = SimpleNamespace(num_image_tokens=processor.num_image_tokens, video_token="<video>")
    video = np.zeros((frames, 384, 384, 3), np.uint8)
    expanded = transformers.LlavaOnevisionProcessor.replace_video_token(me, {"pixel_values_videos": [video]}, 0)
    return processor.tokenizer(prompt.replace("<video>", expanded), return_tensors="pt").input_ids


def test_video_answer_equals_transformers(pipe, hf_model, processor, photo):
    frames = [photo.crop((16 * i, 8 * i, 16 * i + 320, 8 * i + 240)) for i in range(6)]
    pixels = pipe.model.family.preprocess_frames(frames)
    for frame, px in zip(frames, pixels):  # a frame is the image processor's base tile
        assert (px == processor.image_processor(frame, return_tensors="np")["pixel_values"][0][0]).all()
    text = "What happens in this video?"
    ours = pipe.generate(text, config=GenerationConfig(max_new_tokens=12, num_frames=6), videos=[frames])
    ids = hf_video_ids(processor, text, 6)
    assert (ours.prompt_tokens, ours.video_tokens, ours.video_frames) == (ids.shape[1], 6 * 196 + 1, 6)
    with torch.no_grad():
        expected = hf_model.model.get_video_features(torch.from_numpy(pixels)[None]).pooler_output[0].numpy()
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=torch.from_numpy(pixels)[None],
                                max_new_tokens=12, do_sample=False)  # fmt: skip
    prepared = pipe.prepare([Message("user", text, videos=[frames])], GenerationConfig(num_frames=6))
    assert abs(prepared.images[0].features - expected).max() < 1e-3
    ref = out[0, ids.shape[1] :].tolist()
    ref = ref[: ref.index(151645)] if 151645 in ref else ref
    assert ours.token_ids[: len(ref)] == ref and len(ref) > 0


def test_video_budget_and_pruning(pipe, photo):
    from llava_ov.runtime.pruning import kept_count

    frames = [photo.rotate(3 * i) for i in range(8)]
    prompt = pipe.prepare([Message("user", "x", videos=[frames])], GenerationConfig(num_frames=8, max_image_tokens=3 * 196 + 1))
    assert (prompt.video_frames, prompt.video_tokens) == (3, 3 * 196 + 1)
    result = pipe.generate("Describe.", config=GenerationConfig(max_new_tokens=4, num_frames=4, visual_token_pruning=0.5), videos=[frames])
    assert result.video_tokens == 1 + kept_count(4 * 196, 0.5) and result.token_ids


# ----------------------------------------------------------------------------- conversion and compression


def test_fp16_export_keeps_rotary_frequencies_fp32(checkpoint, tmp_path):
    from llava_ov.exporting.convert import ConvertOptions, convert
    from llava_ov.runtime.export import ExportDir

    out = convert(str(checkpoint), tmp_path / "fp16", ConvertOptions(weight_format="fp16", show_progress=False))
    language = ExportDir.open(out).record().parts["language"]
    assert (language["precision"], language["rotary_frequencies"]) == ("fp16", "fp32")


def test_int4_language_model_and_int8_ptq_vision(pipe, photos, photo, tmp_path, capsys):
    from llava_ov import cli
    from llava_ov.runtime.export import ExportDir

    out = tmp_path / "int4-ptq"
    argv = ["compress", str(pipe.model.dir), "-o", str(out), "--lm", "int4_sym", "--vision", "int8_ptq",
            "--calib-images", "2", "--calibration", str(Path(photos["coffee"]).parent)]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    parts = ExportDir.open(out).record().parts
    assert (parts["language"]["precision"], parts["vision"]["precision"]) == ("int4_sym g64 r0.6 + int8", "int8_ptq")
    compressed = Pipeline(out, cache_dir=None)  # the plugin's default precision
    result = compressed.generate(ask([photo.resize((640, 420))]), config=GenerationConfig(max_new_tokens=4))
    assert len(result.token_ids) == 4 and result.image_tokens == pipe.prepare(ask([photo.resize((640, 420))])).image_tokens


def test_server_takes_a_video_for_onevision(pipe, photo, tmp_path):
    """The server's video_url part on this family: frames x 196 + 1 tokens, the Python API's answer."""
    import base64

    import httpx

    from llava_ov.frontends.server.app import create_app
    from llava_ov.frontends.server.settings import ServerSettings
    from llava_ov.runtime.settings import LoadSettings
    from test_server import running, wait_ready
    from videos import write_video

    clip = write_video(tmp_path / "pan.mp4", 8, size=(160, 120), fps=8,
                       frame=lambda i, w, h: np.asarray(photo.crop((12 * i, 6 * i, 12 * i + w, 6 * i + h))))  # fmt: skip
    expected = pipe.generate("What happens?", config=GenerationConfig(max_new_tokens=8, num_frames=4), videos=[clip])
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    content = [{"type": "text", "text": "What happens?"}, {"type": "video_url", "video_url": {"url": url}}]
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "num_frames": 4}
    settings = ServerSettings(model=str(pipe.model.dir), load=LoadSettings(properties=F32, cache_dir=None))
    with running(create_app(settings, pipeline_factory=lambda: pipe)) as base:
        wait_ready(base)
        answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()
    assert answer["usage"]["video_tokens"] == 4 * 196 + 1 == expected.video_tokens
    assert answer["choices"][0]["message"]["content"] == expected.text


def test_the_checkpoints_video_settings_reach_the_export(checkpoint, tmp_path):
    """OneVision's Hub repos keep the video processor's settings in video_processor/: the export gets them."""
    import json
    import shutil

    from llava_ov.exporting.convert import copy_video_settings
    from llava_ov.runtime.export import ExportDir

    source = tmp_path / "ckpt"
    shutil.copytree(checkpoint, source)
    (source / "video_processor").mkdir()
    settings = {"image_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 192, "width": 192},
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}  # fmt: skip
    (source / "video_processor" / "preprocessor_config.json").write_text(json.dumps(settings))
    export = tmp_path / "export"
    export.mkdir()
    assert copy_video_settings(str(checkpoint), None, export) is None  # none: the image settings stand in
    assert copy_video_settings(str(source), None, export) is not None
    assert ExportDir(export).video_config.base_size == (192, 192)
