"""The image-token budget: each resolution it picks equals transformers run with that reduced pinpoint list."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import F32, FAMILIES
from llava_ov.families.llava_next.runtime import anyres_resolutions, packed_length
from llava_ov.runtime.budget import Resolution, fit_budget
from llava_ov.errors import ContextLengthError
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.export import ImageConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from reference import hf_generate, hf_inputs

QUESTION = "Describe this image in detail."
MISTRAL_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@pytest.fixture(scope="module")
def pipes(exports):
    return {fam: Pipeline(exports[fam], properties=F32, cache_dir=None) for fam in FAMILIES}


def _config(max_image_tokens=None):
    return GenerationConfig(max_new_tokens=24, max_image_tokens=max_image_tokens)


class _ReducedPinpoints:
    """transformers' model and processor with another `image_grid_pinpoints` for the block's duration."""

    def __init__(self, model, processor, pinpoints):
        self.targets = [model.config, processor.image_processor]
        self.value = [list(p) for p in pinpoints]

    def __enter__(self):
        self.saved = [copy.deepcopy(t.image_grid_pinpoints) for t in self.targets]
        for target in self.targets:
            target.image_grid_pinpoints = self.value

    def __exit__(self, *exc):
        for target, saved in zip(self.targets, self.saved):
            target.image_grid_pinpoints = saved


def _hf_base_only(model, processor, messages, token_ids, monkeypatch, max_new_tokens=24) -> list[int]:
    """transformers given only the base tile of the image: LLaVA-NeXT packs a one-tile image as its
    features plus image_newline. Its processor always adds grid tiles, so the pixels are cut to the
    base tile, the patch count it infers from the pinpoints is set to 1, and our prompt ids stand for
    the processor's."""
    import transformers.models.llava_next.modeling_llava_next as modeling

    monkeypatch.setattr(modeling, "image_size_to_num_patches", lambda *args, **kwargs: 1)
    inputs = hf_inputs(processor, messages)
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"][:, :1],
            image_sizes=inputs["image_sizes"], max_new_tokens=max_new_tokens, do_sample=False,
        )  # fmt: skip
    monkeypatch.undo()
    tokens = out[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    return tokens[: next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]


@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "rocket", "motorcycle_left"])
def test_every_budgeted_resolution_equals_transformers_with_reduced_pinpoints(
    photo, pipes, hf_models, photos, monkeypatch
):
    pipe = pipes["llava-next"]
    model, processor = hf_models["llava-next"]
    image = Image.open(photos[photo])
    options = pipe.model.family.resolutions((image.height, image.width))
    assert len(options) >= 3 and options[-1].pinpoints == ()
    messages = [Message("user", QUESTION, [photos[photo]])]
    for option in options[1:]:
        prompt = pipe.prepare(messages, _config(option.tokens))
        assert prompt.image_tokens == option.tokens <= options[0].tokens, option
        result = pipe.generate(messages, config=_config(option.tokens))
        assert result.image_tokens == option.tokens and result.image_tokens_total == options[0].tokens
        if option.pinpoints:
            with _ReducedPinpoints(model, processor, option.pinpoints):
                np.testing.assert_array_equal(prompt.token_ids, hf_inputs(processor, messages)["input_ids"][0])
                ref = hf_generate(model, processor, messages, max_new_tokens=24)
        else:
            ref = _hf_base_only(model, processor, messages, prompt.token_ids.tolist(), monkeypatch)
        assert len(set(ref)) > 3, "reference collapsed into repeats"
        assert result.token_ids == ref, option.label


def test_a_budget_between_resolutions_takes_the_largest_that_fits(pipes, photos):
    pipe = pipes["llava-next"]
    image = Image.open(photos["astronaut"])
    options = pipe.model.family.resolutions((image.height, image.width))
    messages = [Message("user", QUESTION, [photos["astronaut"]])]
    assert pipe.count_tokens(messages, _config(options[0].tokens + 1000)) == pipe.count_tokens(messages)
    for upper, lower in zip(options, options[1:]):
        prompt = pipe.prepare(messages, _config(upper.tokens - 1))
        assert prompt.image_tokens == lower.tokens
        assert pipe.count_tokens(messages, _config(upper.tokens - 1)) == len(prompt.token_ids)


def test_the_budget_is_per_request_over_several_images(pipes, photos):
    pipe = pipes["llava-next"]
    messages = [Message("user", "Compare these.", [photos["astronaut"], photos["chelsea"], photos["rocket"]])]
    full = pipe.prepare(messages)
    budget = full.image_tokens // 2
    prompt = pipe.prepare(messages, _config(budget))
    assert prompt.image_tokens <= budget < full.image_tokens
    assert prompt.image_tokens_total == full.image_tokens
    result = pipe.generate(messages, config=_config(budget))
    assert result.image_tokens == prompt.image_tokens and result.token_ids


def test_a_budget_below_the_base_tiles_is_refused_before_encoding(pipes, photos, monkeypatch):
    for fam, pipe in pipes.items():
        monkeypatch.setattr(pipe.model, "encode_image_tiles", lambda px: pytest.fail("encoded a refused prompt"))
        messages = [Message("user", QUESTION, [photos["astronaut"], photos["chelsea"]])]
        with pytest.raises(ContextLengthError, match="max_image_tokens=500 is below"):
            pipe.generate(messages, config=_config(500))
        monkeypatch.undo()


def test_llava_15_has_one_fixed_resolution(pipes, photos):
    pipe = pipes["llava"]
    messages = [Message("user", QUESTION, [photos["chelsea"]])]
    plain = pipe.generate(messages, config=_config())
    assert pipe.generate(messages, config=_config(576)).token_ids == plain.token_ids
    assert plain.image_tokens == plain.image_tokens_total == 576


def _image_config() -> ImageConfig:
    return ImageConfig(image_grid_pinpoints=MISTRAL_PINPOINTS, crop_size={"height": 336, "width": 336})


def test_resolutions_of_a_square_photo_on_the_real_pinpoints():
    options = anyres_resolutions(_image_config(), (672, 672), lambda grid: packed_length(576, (672, 672), grid, True), 577)
    assert [(o.label, o.tokens) for o in options] == [("full", 2928), ("1x2", 1176), ("base", 577)]


def test_fit_budget_lowers_the_largest_image_first():
    big = [Resolution(None, 2928, (2, 2)), Resolution(((336, 672),), 1176, (1, 2)), Resolution((), 577, (0, 0))]
    small = [Resolution(None, 1500, (1, 2)), Resolution((), 577, (0, 0))]
    assert [r.tokens for r in fit_budget([big, small], 3000)] == [1176, 1500]
    assert [r.tokens for r in fit_budget([big, small], 2000)] == [1176, 577]
    assert [r.tokens for r in fit_budget([big, small], None)] == [2928, 1500]
    with pytest.raises(ContextLengthError, match="at least 1154"):
        fit_budget([big, small], 1000)
