"""The image stage of the runtime: load an image safely, turn it into pixel tiles.

Owns image decoding (bounded in bytes and pixels before decoding, EXIF
orientation, every PIL mode to RGB) and the generic steps the families'
preprocessings are made of (llava_ov/families/*/runtime.py), in numpy + PIL so
the runtime needs neither torch nor transformers: transformers' resize and
center crop on uint8 RGB with the same integer size arithmetic, grid selection
(`best_resolution`), and rescale+normalize in the reference's float64->float32
order (through a 256-entry lookup table per channel, so one gather makes the floats).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from llava_ov.common.files import check_pixels, check_size, read_bounded
from llava_ov.errors import InvalidImageError, UnsupportedModelError
from llava_ov.runtime.export import ImageConfig

EXIF_ORIENTATION = 0x0112
# What users send; nothing else is opened (no ICO/EPS/PSD/...: decoders that decode before any size check,
# or hand the bytes to Ghostscript). JPEG includes MPO, the JPEG variant phone cameras write.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_MIME_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/webp", "image/gif",
                              "image/bmp", "image/x-ms-bmp", "image/tiff"})  # fmt: skip

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray]


# ----------------------------------------------------------------------------- pixels of one image


@dataclass
class ProcessedImage:
    """Model-ready pixels of one image."""

    pixel_values: np.ndarray  # float32 [num_tiles, 3, H, W]; anyres: base image first, then tiles row-major
    image_size: tuple[int, int]  # original (height, width) after EXIF rotation
    grid: tuple[int, int]  # (rows, cols) of the anyres grid; (1, 1) for CLIP preprocessing


# ----------------------------------------------------------------------------- loading


def _read_source(source: str | Path, max_bytes: int) -> bytes:
    return read_bounded(source, max_bytes, "image", InvalidImageError)


def _check_bytes(n: int, max_bytes: int) -> None:
    check_size(n, max_bytes, "image", InvalidImageError)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse images whose header claims more pixels than allowed (decompression bombs)."""
    check_pixels(width, height, max_pixels, "image", InvalidImageError)


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


def check_encoded(source: str | Path | bytes, *, max_bytes: int, max_pixels: int) -> tuple[bytes, int]:
    """(an image's encoded bytes, its declared pixels) once its size, format and declared dimensions pass,
    without decoding any pixel: what a server keeps while a request waits (decoded images are ~100x larger)."""
    data = _read_source(source, max_bytes) if isinstance(source, (str, Path)) else bytes(source)
    _check_bytes(len(data), max_bytes)
    img = _open_checked(data, max_pixels)
    return data, img.width * img.height


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


def source_bytes(source: ImageSource, max_bytes: int = 50_000_000) -> ImageSource:
    """A file source's bytes (read once, bounded); any other source as it is."""
    return _read_source(source, max_bytes) if isinstance(source, (str, Path)) else source


def declared_size(source: ImageSource, *, max_bytes: int = 50_000_000, max_pixels: int = 100_000_000) -> tuple[int, int]:
    """(height, width) an image will have once decoded and upright, from its header alone: what a prompt's
    token count and refusals need before any image is decoded (InvalidImageError as `load_image`).

    The orientation is the EXIF/XMP one its header carries; a PNG whose eXIf chunk follows the pixel data
    is counted as stored (its orientation is known only once decoded)."""
    if isinstance(source, np.ndarray):
        height, width = source.shape[:2]
        return int(height), int(width)
    if isinstance(source, Image.Image):
        img = source
    else:
        data = _read_source(source, max_bytes) if isinstance(source, (str, Path)) else bytes(source)
        _check_bytes(len(data), max_bytes)
        img = _open_checked(data, max_pixels)
    width, height = img.size
    return (width, height) if _header_orientation(img) in _TRANSPOSING else (height, width)


_TRANSPOSING = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def _header_orientation(img: Image.Image) -> int:
    """The EXIF orientation still to apply, as known without decoding (Pillow reads a PNG's late eXIf chunk by
    decoding; it reports a TIFF's size upright already)."""
    if img.format == "TIFF" or (img.format == "PNG" and "exif" not in img.info):
        return 1
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a malformed EXIF block: decoding reports the image's problems
        return 1


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


def fit_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
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


def resize_crop(img: Image.Image | np.ndarray, cfg: ImageConfig) -> np.ndarray:
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


def to_float(tiles: list[np.ndarray], cfg: ImageConfig) -> np.ndarray:
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
