"""Image features -> prompt embeddings: the merge at `<image>`.

How a family packs its tile features into image tokens is the family's own
(`Family.pack`, llava_ov/families/*/runtime.py); this module only writes the
packed features into the prompt's image positions.
"""

from __future__ import annotations

import numpy as np


def merge_embeddings(text_embeds: np.ndarray, image_mask: np.ndarray, image_features: list[np.ndarray]) -> np.ndarray:
    """Write image features (in order) into the rows of `text_embeds` where `image_mask` is set."""
    feats = np.concatenate(image_features, axis=0) if image_features else np.zeros((0, text_embeds.shape[-1]))
    if int(image_mask.sum()) != len(feats):
        raise ValueError(f"prompt has {int(image_mask.sum())} image positions but {len(feats)} image features")
    out = text_embeds.copy()
    out[image_mask] = feats
    return out
