"""Feature packing against transformers' pack_image_features, for every anyres grid shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llava_ov.families.llava.runtime import pack_single
from llava_ov.families.llava_next.runtime import pack_anyres, preprocess_anyres, unpad_bounds
from llava_ov.runtime.export import ImageConfig
from llava_ov.runtime.features import merge_embeddings

# (height, width) image sizes that select each pinpoint of llava-v1.6: 1x2, 2x1, 2x2, 3x1, 1x3 grids,
# plus sizes where unpadding crops rows or columns, and a tie case (both sides <= 336).
SIZES = [(300, 700), (700, 300), (650, 640), (1000, 330), (330, 1000), (400, 1200), (500, 333), (200, 300)]


@pytest.mark.parametrize("size", SIZES)
def test_packed_features_equal_transformers(size, hf_models, photos):
    model, processor = hf_models["llava-next"]
    image = Image.open(photos["astronaut"]).convert("RGB").resize(size[::-1])
    processed = preprocess_anyres(image, ImageConfig.from_dict(processor.image_processor.to_dict()))
    pixel_values = torch.from_numpy(processed.pixel_values)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        tiles = model.model.multi_modal_projector(hidden)
        ref, lens = model.model.pack_image_features(
            [tiles], torch.tensor([size]), "default", image_newline=model.model.image_newline
        )
    newline = model.model.image_newline.detach().numpy()
    ours = pack_anyres(tiles.numpy(), processed.image_size, processed.grid, newline)
    assert ours.shape == tuple(ref[0].shape)
    np.testing.assert_array_equal(ours, ref[0].numpy())


def test_llava15_features_pass_through():
    tiles = np.random.default_rng(0).normal(size=(1, 576, 8)).astype(np.float32)
    np.testing.assert_array_equal(pack_single(tiles), tiles[0])


def test_unpad_bounds_crop_the_padded_axis():
    rows, cols = unpad_bounds((48, 24), (1000, 330))  # tall image in a 2x1 canvas: columns padded
    assert rows == slice(0, 48) and cols.stop - cols.start < 24
    rows, cols = unpad_bounds((24, 48), (330, 1000))
    assert cols == slice(0, 48) and rows.stop - rows.start < 24


def test_merge_checks_counts_and_places_features_in_order():
    text = np.zeros((6, 2), np.float32)
    mask = np.array([False, True, True, False, True, False])
    a, b = np.ones((2, 2), np.float32), np.full((1, 2), 2, np.float32)
    merged = merge_embeddings(text, mask, [a, b])
    np.testing.assert_array_equal(merged[:, 0], [0, 1, 1, 0, 2, 0])
    with pytest.raises(ValueError, match="3 image positions but 2"):
        merge_embeddings(text, mask, [a])
