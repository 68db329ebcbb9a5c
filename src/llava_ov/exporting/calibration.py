"""Calibration data for NNCF: real images, their pixel values, and prefill inputs for the language model.

Calibration images (`calibration=`): a folder (png/jpg/jpeg/bmp/gif/webp/tif,
searched recursively, sorted), a list of PIL images or paths, a Hugging Face
dataset id (needs `datasets`, imported lazily; "conceptual_captions" is short for
google-research-datasets/conceptual_captions, whose images are fetched from their
URLs), or None: the real photographs shipped in scikit-image, topped up to the
requested count with seeded augmentations (random crop keeping 50-90 % of each
side, then a horizontal flip with p=0.5).  Images go through the model's own
preprocessing (`llava_ov.runtime.image.preprocess`), so the vision encoder sees its real
pixel_values (all anyres tiles).

Data-aware LM calibration (limits): one prefill per sample, built here in a
simple way - "<image>\\n{question} {answer}" (no chat template; answers are
dataset captions when there are any), tokenized with the export's tokenizer, the
`<image>` token replaced by the vision features of the *base tile only* (576
tokens, without unpad/image_newline packing: the full anyres sequence of up to
~2,900 tokens would make every calibration prefill ~5x longer).  NNCF resets
the stateful LM's KV state before every sample, so each sample is a fresh
prefill; decode steps (one token over a long cache) are not represented.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llava_ov.common import layout
from llava_ov.errors import LlavaOvError
from llava_ov.runtime.image import load_image  # bounded decode, EXIF orientation, any mode -> RGB

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DATASET_ALIASES = {"conceptual_captions": "google-research-datasets/conceptual_captions"}
# Photographs in the scikit-image wheel (no download): colour first, then greyscale.
SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
    "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "moon.png", "coins.png", "page.png",
)  # fmt: skip
PROMPTS = (
    ("Describe this image in detail.", "The picture shows a scene with several objects under natural light."),
    ("What is in the picture?", "There is a main subject in the centre and some background around it."),
    ("What colours dominate this photo?", "Mostly muted tones, with a few bright highlights."),
    ("Is there any text in the image? Read it.", "I can see a few words, but most of the image is not text."),
    ("Where could this photo have been taken?", "It looks like it was taken indoors, or in a laboratory."),
    ("Count the main objects.", "I count three main objects, one of them partly hidden."),
    ("What is unusual about this image?", "The lighting and the framing are unusual for an everyday photo."),
    ("Write a short caption for this image.", "A close look at an everyday subject."),
)

@dataclass
class CalibrationImages:
    images: list  # RGB PIL images
    source: str  # for export_info.json
    captions: list[str] | None = None  # one per image, when the source has them
    augmented: int = 0  # how many of `images` are augmentations


def _skimage_images(count: int) -> CalibrationImages:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise LlavaOvError("scikit-image is not installed: pass calibration images (a folder or a list) instead")
    folder = Path(spec.origin).parent / "data"
    names = [name for name in SKIMAGE_PHOTOS if (folder / name).exists()]
    if not names:
        raise LlavaOvError(f"no photographs found in {folder}: pass calibration images (a folder or a list)")
    images = [load_image(folder / name) for name in names[:count]]
    base, rng = list(images), np.random.default_rng(0)
    while len(images) < count:
        images.append(_augment(base[len(images) % len(base)], rng))
    extra = len(images) - len(base)
    source = f"scikit-image photos ({len(base)}" + (f" + {extra} augmentations)" if extra else ")")
    return CalibrationImages(images, source, None, augmented=extra)


def _augment(img, rng: np.random.Generator):
    """A random crop keeping 50-90 % of each side, flipped horizontally half the time."""
    from PIL import ImageOps

    w, h = img.size
    cw, ch = int(w * rng.uniform(0.5, 0.9)), int(h * rng.uniform(0.5, 0.9))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((left, top, left + cw, top + ch))
    return ImageOps.mirror(out) if rng.random() < 0.5 else out


def _folder_images(folder: Path, count: int) -> CalibrationImages:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LlavaOvError(f"calibration folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    images, skipped = [], []
    for path in files:
        if len(images) == count:
            break
        try:
            images.append(load_image(path))
        except LlavaOvError:
            skipped.append(path.name)
    if not images:
        raise LlavaOvError(f"no image in calibration folder {folder} could be decoded ({', '.join(skipped[:5])})")
    note = f", {len(skipped)} undecodable skipped" if skipped else ""
    return CalibrationImages(images, f"folder {folder}{note}")


def _list_images(items: Sequence, count: int) -> CalibrationImages:
    if len(items) == 0:
        raise LlavaOvError("the list of calibration images is empty")
    return CalibrationImages([load_image(item) for item in list(items)[:count]], f"{len(items)} given images")


def _fetch_image(url: str, max_bytes: int = 20_000_000):
    from llava_ov.runtime.fetch import FetchPolicy, fetch_url

    return load_image(fetch_url(url, FetchPolicy(max_bytes=max_bytes, fetch_timeout_s=5.0)), max_bytes=max_bytes)


def _dataset_images(dataset_id: str, count: int) -> CalibrationImages:
    try:
        import datasets
    except ImportError:
        raise LlavaOvError(
            f"calibration {dataset_id!r} is not a folder, and loading it as a Hugging Face dataset needs the "
            "`datasets` package (pip install datasets); or pass a folder of images, or no calibration to use "
            "the offline scikit-image photos"
        ) from None
    name = DATASET_ALIASES.get(dataset_id, dataset_id)
    try:
        rows = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as exc:  # network, missing dataset, auth: one message
        raise LlavaOvError(f"could not load dataset {name!r}: {type(exc).__name__}: {str(exc)[:200]}") from None
    images, captions, failed = [], [], 0
    for row in rows:
        if len(images) >= count or failed > 2 * count + 10:
            break
        url = row.get("image_url") or row.get("url")
        if row.get("image") is None and not isinstance(url, str):
            raise LlavaOvError(f"dataset {name} has no `image` or `image_url` column; pass a folder of images instead")
        try:
            if row.get("image") is not None:
                image = load_image(row["image"])
            elif url.startswith(("http://", "https://")):
                image = _fetch_image(url)
            else:
                raise LlavaOvError(f"not an http(s) URL: {url[:80]}")
        except Exception:  # dead links, timeouts, broken files: common in Conceptual Captions
            failed += 1
            continue
        images.append(image)
        captions.append(next((row[k] for k in ("caption", "text", "sentence") if isinstance(row.get(k), str)), ""))
    if not images:
        raise LlavaOvError(f"no usable image in dataset {name} ({failed} failed)")
    return CalibrationImages(images, f"dataset {name} ({failed} rows skipped)", captions if any(captions) else None)


def calibration_images(calibration: Any, count: int) -> CalibrationImages:
    """Up to `count` RGB images from a folder, a list, a dataset id, or (None) scikit-image photos."""
    if calibration is None:
        return _skimage_images(count)
    if isinstance(calibration, (str, Path)):
        path = Path(calibration).expanduser()
        if path.is_dir():
            return _folder_images(path, count)
        if path.is_file():
            return _list_images([path], count)
        text = str(calibration)
        if text.startswith((".", "/", "~")) or os.sep in text.replace("/", "") or text.count("/") > 1:
            raise LlavaOvError(f"no such calibration folder: {calibration}")
        return _dataset_images(text, count)
    if isinstance(calibration, Sequence):
        return _list_images(calibration, count)
    raise LlavaOvError(f"unsupported calibration source of type {type(calibration).__name__}")


def pixel_values_for(export_dir: Path, images: list) -> list[np.ndarray]:
    """The model's real pixel_values [tiles, 3, H, W] for each image (llava_ov.runtime.image)."""
    from llava_ov.runtime.export import ExportDir
    from llava_ov.runtime.families import load_family

    family = load_family(ExportDir(export_dir))
    out = []
    for source in images:
        image = load_image(source)
        own = family.resolutions((image.height, image.width))[0]  # the model's own resolution
        out.append(np.ascontiguousarray(family.preprocess(image, own).pixel_values, dtype=np.float32))
    return out


def language_calibration(
    export_dir: Path, pixels: list[np.ndarray], captions: list[str] | None, count: int
) -> list[dict[str, np.ndarray]]:
    """`count` prefill inputs for the stateful LM: image (base tile) + question + answer."""
    import openvino as ov
    import openvino_tokenizers  # noqa: F401  (registers the tokenizer ops)

    core = ov.Core()
    tokenizer = core.compile_model(export_dir / layout.TOKENIZER_MODEL, "CPU")
    embed = core.compile_model(export_dir / layout.TEXT_EMBEDDINGS_MODEL, "CPU")
    vision = core.compile_model(export_dir / layout.VISION_MODEL, "CPU")
    from llava_ov.runtime.export import ExportDir
    from llava_ov.runtime.families import load_family

    image_id = load_family(ExportDir(export_dir)).image_token_id
    lm_inputs = {p.get_any_name(): p for p in core.read_model(export_dir / layout.LANGUAGE_MODEL).inputs}
    samples = []
    for i in range(count):
        question, answer = PROMPTS[i % len(PROMPTS)]
        if captions:
            answer = captions[i % len(captions)] or answer
        ids = tokenizer([f"<image>\n{question} {answer}"])["input_ids"].astype(np.int64)
        text = embed(ids)[0]
        feats = vision(pixels[i % len(pixels)][:1])[0].reshape(1, -1, text.shape[-1])
        where = np.flatnonzero(ids[0] == image_id)
        at = int(where[0]) if len(where) else 1  # no <image> token: put the image after BOS
        cut = at + 1 if len(where) else at
        embeds = np.concatenate([text[:, :at], feats, text[:, cut:]], axis=1).astype(np.float32)
        n = embeds.shape[1]
        sample = {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
            "beam_idx": np.zeros(1, np.int32),
        }
        dtypes = {k: lm_inputs[k].get_element_type().to_dtype() for k in sample if k in lm_inputs}
        samples.append({k: sample[k].astype(dtype) for k, dtype in dtypes.items()})
    return samples
