"""The image stage of the runtime: load an image safely, turn it into pixel tiles.

Owns image decoding (bounded in bytes and pixels before decoding, EXIF
orientation, every PIL mode to RGB) and the two preprocessings of the supported
families, written in numpy + PIL so the runtime needs neither torch nor
transformers:

- "anyres" (LLaVA-NeXT): equal to transformers' `LlavaNextImageProcessorPil`.
- "clip"   (LLaVA-1.5):  equal to transformers' `CLIPImageProcessorPil`.

Both reproduce the reference bit for bit: the same PIL resize calls on uint8
RGB, the same integer size arithmetic, zero padding centred with the odd pixel
after, and rescale+normalize done in the reference's float64->float32 order
(through a 256-entry lookup table per channel, so one gather makes the floats).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
from PIL import Image, ImageOps

from llava_ov.errors import InvalidImageError, ModelNotFoundError, UnsupportedModelError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
EXIF_ORIENTATION = 0x0112
# What users send; nothing else is opened (no ICO/EPS/PSD/...: decoders that decode before any size check,
# or hand the bytes to Ghostscript). JPEG includes MPO, the JPEG variant phone cameras write.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_MIME_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/webp", "image/gif",
                              "image/bmp", "image/x-ms-bmp", "image/tiff"})  # fmt: skip

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray]


# ----------------------------------------------------------------------------- config


def _size_dict(value: Any, square: bool) -> dict[str, int]:
    """A transformers size setting (int, [h, w] or dict) as a dict, like get_size_dict."""
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if v is not None}
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    raise UnsupportedModelError(f"unsupported image size setting {value!r} in the preprocessor config")


@dataclass(frozen=True)
class ImageConfig:
    """The image-processor settings of a checkpoint (preprocessor_config.json)."""

    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})
    crop_size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    do_convert_rgb: bool = True  # always done: the vision tower takes RGB
    do_pad: bool = True  # batch padding of the tile count; no effect on one image
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    image_processor_type: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "ImageConfig":
        """From a preprocessor_config.json dict or a transformers-5 processor_config.json dict."""
        if isinstance(d.get("image_processor"), dict):
            d = d["image_processor"]
        kw: dict[str, Any] = {k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None}
        if "size" in kw:
            kw["size"] = _size_dict(kw["size"], square=False)
        if "crop_size" in kw:
            kw["crop_size"] = _size_dict(kw["crop_size"], square=True)
        for key in ("image_mean", "image_std"):
            if key in kw:
                kw[key] = tuple(float(v) for v in (kw[key] if isinstance(kw[key], (list, tuple)) else [kw[key]] * 3))
        if "image_grid_pinpoints" in kw:
            kw["image_grid_pinpoints"] = tuple((int(h), int(w)) for h, w in kw["image_grid_pinpoints"])
        cfg = cls(**kw)
        _resize_size((1, 1), cfg.size)  # reject an unsupported size setting now, not at the first image
        return cfg

    @classmethod
    def from_export(cls, export_dir: str | Path) -> "ImageConfig":
        """Read preprocessor_config.json, else processor_config.json, from a folder."""
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = Path(export_dir) / name
            if path.is_file():
                return cls.from_dict(json.loads(path.read_text()))
        raise ModelNotFoundError(f"{export_dir} has no preprocessor_config.json or processor_config.json")

    @property
    def base_size(self) -> tuple[int, int]:
        """(height, width) the whole image is resized to for the anyres base tile."""
        if "height" in self.size and "width" in self.size:
            return self.size["height"], self.size["width"]
        if "shortest_edge" in self.size:
            return self.size["shortest_edge"], self.size["shortest_edge"]
        raise UnsupportedModelError(f"unsupported image size setting {self.size!r} in the preprocessor config")

    @property
    def patch_size(self) -> int:
        """Side of an anyres grid tile (crop height, else size height, else shortest edge)."""
        return self.crop_size.get("height") or self.size.get("height") or self.size["shortest_edge"]


@dataclass
class ProcessedImage:
    """Model-ready pixels of one image."""

    pixel_values: np.ndarray  # float32 [num_tiles, 3, H, W]; anyres: base image first, then tiles row-major
    image_size: tuple[int, int]  # original (height, width) after EXIF rotation
    grid: tuple[int, int]  # (rows, cols) of the anyres grid; (1, 1) for CLIP preprocessing


# ----------------------------------------------------------------------------- loading


def _read_source(source: str | Path, max_bytes: int) -> bytes:
    """The bytes of an image file, refusing missing, non-file and oversize paths."""
    path = Path(source)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InvalidImageError(f"image file not found: {path}") from None
    except OSError as e:
        raise InvalidImageError(f"cannot read image file {path}: {e.strerror or e}") from None
    if not path.is_file():
        raise InvalidImageError(f"not an image file: {path}")
    _check_bytes(size, max_bytes)
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidImageError(f"cannot read image file {path}: {e.strerror or e}") from None


def _check_bytes(n: int, max_bytes: int) -> None:
    """Refuse empty and oversize inputs."""
    if n == 0:
        raise InvalidImageError("image is empty (0 bytes)")
    if n > max_bytes:
        raise InvalidImageError(f"image is {n:,} bytes, over the limit of {max_bytes:,} bytes")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse images whose header claims more pixels than allowed (decompression bombs)."""
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} pixels "
            "(possible decompression bomb)"
        )


_PIL_BOMB = "image header claims more pixels than Pillow will decode (possible decompression bomb)"


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    """Decode bytes, checking the header's pixel count before decoding any pixels."""
    return _load_pixels(_open_checked(data, max_pixels))


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open bytes lazily (header only) with the allowed formats, refusing too many declared pixels."""
    try:
        with warnings.catch_warnings():  # Pillow warns above its own limit; ours is checked just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError:
        raise InvalidImageError(_PIL_BOMB) from None
    except Image.UnidentifiedImageError:
        raise InvalidImageError(
            f"image data is not a supported image ({', '.join(IMAGE_FORMATS)}), "
            "or it is corrupt"
        ) from None
    except Exception as e:  # Pillow plugins raise many types on bad headers; all mean "corrupt"
        raise InvalidImageError(f"image data is corrupt: {_one_line(e)}") from None
    _check_pixels(img.width, img.height, max_pixels)
    return img


def check_encoded(source: str | Path | bytes, *, max_bytes: int, max_pixels: int) -> bytes:
    """An image's encoded bytes once its size, format and declared dimensions pass, without decoding
    any pixel: what a server keeps while a request waits (decoded images are ~100x larger)."""
    data = _read_source(source, max_bytes) if isinstance(source, (str, Path)) else bytes(source)
    _check_bytes(len(data), max_bytes)
    _open_checked(data, max_pixels)
    return data


def _load_pixels(img: Image.Image) -> Image.Image:
    """Decode the pixels of a lazily opened image, mapping decoder failures to InvalidImageError."""
    try:
        img.load()
    except Image.DecompressionBombError:
        raise InvalidImageError(_PIL_BOMB) from None
    except Exception as e:  # truncated/corrupt data surfaces as OSError, SyntaxError, ValueError, zlib.error...
        raise InvalidImageError(f"image data is corrupt or truncated: {_one_line(e)}") from None
    return img


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _from_array(a: np.ndarray, max_pixels: int) -> Image.Image:
    """An HxW / HxWx{1,3,4} uint8, uint16 or [0, 1] float array as an RGB image.

    RGBA arrays are composited onto white with transformers' numpy formula (float, np.round).
    """
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise InvalidImageError(f"unsupported image array shape {a.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    _check_pixels(a.shape[1], a.shape[0], max_pixels)
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            raise InvalidImageError("float image arrays must hold finite values in [0, 1]")
        a = np.round(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise InvalidImageError(f"unsupported image array dtype {a.dtype}; expected uint8, uint16 or float in [0, 1]")
    if a.ndim == 3 and a.shape[2] == 4:
        alpha = a[..., 3:4] / 255
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(a))
    return img if img.mode == "RGB" else img.convert("RGB")


def _high_byte(img: Image.Image) -> Image.Image:
    """16/32-bit grayscale ("I;16*", "I") as 8-bit "L", keeping the high byte.

    Pillow itself decodes 16-bit RGB PNGs this way; transformers instead lets
    PIL clip every value above 255 to white. "I" images already in 0..255 are
    kept. A 16-bit transparency key (rare) is dropped.
    """
    a = np.asarray(img)
    if img.mode == "I" and 0 <= a.min() and a.max() <= 255:
        return Image.fromarray(a.astype(np.uint8))
    return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB exactly as transformers' convert_to_rgb: any transparency composited onto white."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        img = _high_byte(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (PIL.ImageOps.exif_transpose), without a copy when upright."""
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    return img if orientation in (1, None) else ImageOps.exif_transpose(img)


def load_image(source: ImageSource, *, max_bytes: int = 50_000_000, max_pixels: int = 100_000_000) -> Image.Image:
    """Any supported image source as an upright RGB PIL image; InvalidImageError for bad input."""
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, (str, Path)):
        img = _decode(_read_source(source, max_bytes), max_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        _check_bytes(len(source), max_bytes)
        img = _decode(bytes(source), max_pixels)
    elif isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, max_pixels)
        img = _load_pixels(source)
    else:
        raise InvalidImageError(f"unsupported image source of type {type(source).__name__}")
    try:
        return to_rgb(_exif_upright(img))
    except Exception as e:  # e.g. a mode PIL cannot convert to RGB
        raise InvalidImageError(f"cannot convert image (mode {img.mode}) to RGB: {_one_line(e)}") from None


# ----------------------------------------------------------------------------- geometry


def best_resolution(image_size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The grid resolution (height, width) for an image, as transformers' select_best_resolution."""
    height, width = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(ph), int(pw)), effective, wasted
    return best


def _fit_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) that fits image_size into target keeping aspect (get_patch_output_size)."""
    (h, w), (th, tw) = image_size, target
    if tw / w < th / h:
        return min(math.ceil(h * (tw / w)), th), tw
    return th, min(math.ceil(w * (th / h)), tw)


def _resize_size(image_size: tuple[int, int], size: dict[str, int]) -> tuple[int, int]:
    """Output (height, width) of the processor's resize for a size setting."""
    if "shortest_edge" in size and "longest_edge" not in size:
        h, w = image_size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    raise UnsupportedModelError(f"unsupported image size setting {size!r} in the preprocessor config")


def _center_crop(a: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """Center crop of an HxWxC array, zero-padding first when it is smaller (transformers' center_crop)."""
    (h, w), (ch, cw) = a.shape[:2], crop
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return a[top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    pt, pl = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded = np.zeros((nh, nw) + a.shape[2:], a.dtype)
    padded[pt : pt + h, pl : pl + w] = a
    top, left = top + pt, left + pl
    return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def _resize_crop(img: Image.Image | np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """The per-image resize + center crop of the processor's loop, on uint8 HxWx3."""
    h, w = (img.height, img.width) if isinstance(img, Image.Image) else img.shape[:2]
    if cfg.do_resize:
        nh, nw = _resize_size((h, w), cfg.size)
        if (nh, nw) != (h, w):  # PIL returns an identical copy for a same-size resize
            pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
            img = pil.resize((nw, nh), resample=cfg.resample)
    a = np.asarray(img)
    return _center_crop(a, (cfg.crop_size["height"], cfg.crop_size["width"])) if cfg.do_center_crop else a


# ----------------------------------------------------------------------------- pixels


@lru_cache(maxsize=8)
def _lut(do_rescale: bool, factor: float, do_normalize: bool, mean: tuple, std: tuple) -> np.ndarray:
    """[3, 256] float32: each uint8 value after the reference's rescale (float64) and normalize (float32)."""
    v = np.arange(256, dtype=np.float64)
    v = (v * factor).astype(np.float32) if do_rescale else v.astype(np.float32)
    v = np.broadcast_to(v, (3, 256))
    if do_normalize:
        m, s = np.asarray(mean, np.float32)[:, None], np.asarray(std, np.float32)[:, None]
        v = (v - m) / s
    return np.ascontiguousarray(v, dtype=np.float32)


def _to_float(tiles: list[np.ndarray], cfg: ImageConfig) -> np.ndarray:
    """uint8 HxWx3 tiles -> float32 [N, 3, H, W], rescaled and normalized in one gather."""
    lut = _lut(cfg.do_rescale, cfg.rescale_factor, cfg.do_normalize, cfg.image_mean, cfg.image_std)
    shapes = {t.shape for t in tiles}
    if len(shapes) != 1:
        raise ValueError(f"tiles of different shapes {sorted(shapes)}; enable center crop in the config")
    h, w, _ = tiles[0].shape
    out = np.empty((len(tiles), 3, h, w), np.float32)
    for i, t in enumerate(tiles):
        for c in range(3):
            np.take(lut[c], t[..., c], out=out[i, c], mode="clip")  # uint8 is always in range; "clip" skips buffering
    return out


def preprocess_anyres(image: ImageSource, cfg: ImageConfig) -> ProcessedImage:
    """LLaVA-NeXT anyres: base image resized whole, then the grid tiles row-major.

    With no pinpoints (an image-token budget below the smallest grid) only the base tile."""
    img = load_image(image)
    h, w = img.height, img.width
    bh, bw = cfg.base_size
    if not cfg.image_grid_pinpoints:
        base = img.resize((bw, bh), resample=cfg.resample)
        return ProcessedImage(_to_float([_resize_crop(base, cfg)], cfg), (h, w), (0, 0))
    th, tw = best_resolution((h, w), cfg.image_grid_pinpoints)
    nh, nw = _fit_size((h, w), (th, tw))
    canvas = np.zeros((th, tw, 3), np.uint8)  # zero (black) padding, odd pixel after
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas[top : top + nh, left : left + nw] = np.asarray(img.resize((nw, nh), resample=cfg.resample))
    p = cfg.patch_size
    tiles = [canvas[i : i + p, j : j + p] for i in range(0, th, p) for j in range(0, tw, p)]
    base = img.resize((bw, bh), resample=cfg.resample)
    pixels = _to_float([_resize_crop(t, cfg) for t in [base, *tiles]], cfg)
    return ProcessedImage(pixels, (h, w), (math.ceil(th / p), math.ceil(tw / p)))


def preprocess_clip(image: ImageSource, cfg: ImageConfig) -> ProcessedImage:
    """LLaVA-1.5 / CLIP: shortest edge resized, then center crop; one tile."""
    img = load_image(image)
    return ProcessedImage(_to_float([_resize_crop(img, cfg)], cfg), (img.height, img.width), (1, 1))


PREPROCESSORS: dict[str, Callable[[ImageSource, ImageConfig], ProcessedImage]] = {
    "anyres": preprocess_anyres,
    "clip": preprocess_clip,
}


def preprocess(image: ImageSource, cfg: ImageConfig, mode: str) -> ProcessedImage:
    """Preprocess one image with the family's mode ("anyres" or "clip")."""
    try:
        fn = PREPROCESSORS[mode]
    except KeyError:
        known = ", ".join(PREPROCESSORS)
        raise UnsupportedModelError(f"unknown image preprocessing {mode!r}; known: {known}") from None
    return fn(image, cfg)
