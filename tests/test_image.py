"""image.py against transformers' PIL-backend processors (the reference), plus loading errors.

Tolerance: exact (0.0). Both sides run the same PIL resize on the same uint8
pixels and the same float64->float32 rescale/normalize arithmetic, so any
difference at all is a bug.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from llava_ov.errors import InvalidImageError, ModelNotFoundError
from llava_ov.families.llava.runtime import preprocess_clip
from llava_ov.families.llava_next.runtime import preprocess_anyres
from llava_ov.runtime.export import DEFAULT_PINPOINTS, ImageConfig
from llava_ov.runtime.image import best_resolution, load_image

MODES = {"llava-next": "anyres", "llava": "clip"}
PREPROCESSORS = {"anyres": preprocess_anyres, "clip": preprocess_clip}  # each family's own (families/*/runtime.py)


def preprocess(image, cfg, mode):
    return PREPROCESSORS[mode](image, cfg)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field")
TOLERANCE = 0.0


# ----------------------------------------------------------------------------- synthetic images


def pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 HxWx3: colour gradients plus noise, so resizing and tiling errors show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(h + w - 2, 1)], -1)
    return np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgba(h: int, w: int) -> Image.Image:
    """RGBA with fully transparent, half transparent and opaque regions."""
    a = np.concatenate([pattern(h, w, 1), np.zeros((h, w, 1), np.uint8)], -1)
    a[:, w // 3 : 2 * w // 3, 3] = 128
    a[:, 2 * w // 3 :, 3] = 255
    return Image.fromarray(a, "RGBA")


def palette_transparent(h: int, w: int) -> Image.Image:
    img = Image.fromarray(pattern(h, w, 2)).quantize(32)
    img.info["transparency"] = 0
    return img


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with no pixel data (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def exif_jpeg(tmp: Path, orientation: int) -> Path:
    """A 300x500 (HxW) JPEG whose EXIF says to rotate it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp / f"exif{orientation}.jpg"
    path.write_bytes(encode(Image.fromarray(pattern(300, 500, 3)), "JPEG", exif=exif.tobytes(), quality=90))
    return path


def _opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _sized(h: int, w: int, seed: int = 0):
    return lambda tmp, photos: (Image.fromarray(pattern(h, w, seed)),) * 2


def _encoded(make, fmt: str = "PNG", **kw):
    """Source: the encoded bytes; reference: PIL's decode of the same bytes."""

    def build(tmp, photos):
        data = encode(make(), fmt, **kw)
        return data, _opened(data)

    return build


def _photo(name: str):
    return lambda tmp, photos: (photos[name], Image.open(photos[name]))


def _exif(orientation: int):
    def build(tmp, photos):
        path = exif_jpeg(tmp, orientation)
        return path, ImageOps.exif_transpose(Image.open(path))

    return build


def _sixteen_bit(tmp, photos):
    """16-bit grayscale PNG. Reference: transformers on its high byte (see test_16bit_not_clipped)."""
    a = (np.linspace(0, 65535, 120 * 200).reshape(120, 200)).astype(np.uint16)
    data = encode(Image.fromarray(a))
    assert _opened(data).mode == "I;16"
    return data, Image.fromarray((a >> 8).astype(np.uint8))


def _array(make, ref=None):
    return lambda tmp, photos: (make(), (ref or make)())


CASES = {
    **{f"photo-{n}": _photo(n) for n in PHOTOS},
    "tiny-20x30": _sized(20, 30),
    "wide-200x1500": _sized(200, 1500),
    "tall-1500x200": _sized(1500, 200),
    "odd-337x901": _sized(337, 901),
    "square-336": _sized(336, 336),
    **{f"pinpoint-{h}x{w}": _sized(h, w, 5) for h, w in DEFAULT_PINPOINTS},
    **{f"half-pinpoint-{h}x{w}": _sized(h // 2 + 7, w // 2 - 3, 6) for h, w in DEFAULT_PINPOINTS},
    "gray-L": _encoded(lambda: Image.fromarray(pattern(240, 320)[..., 0])),
    "bilevel-1": _encoded(lambda: Image.fromarray(pattern(100, 150)[..., 0] > 128)),
    "rgba-transparent": _encoded(lambda: rgba(200, 300)),
    "la-transparent": _encoded(lambda: rgba(150, 90).convert("LA")),
    "palette": _encoded(lambda: Image.fromarray(pattern(180, 260, 2)).quantize(64)),
    "palette-transparent-png": _encoded(lambda: palette_transparent(180, 260)),
    "palette-transparent-gif": _encoded(lambda: palette_transparent(130, 170), "GIF", transparency=0),
    "rgb-trns": _encoded(lambda: Image.fromarray(pattern(90, 90)), transparency=(0, 0, 0)),
    "cmyk-jpeg": _encoded(lambda: Image.fromarray(pattern(210, 330)).convert("CMYK"), "JPEG", quality=95),
    "gray-16bit": _sixteen_bit,
    "exif-rotate-90": _exif(6),
    "exif-rotate-180": _exif(3),
    "exif-rotate-270": _exif(8),
    "array-rgb": _array(lambda: pattern(250, 400, 7)),
    "array-rgba": _array(lambda: np.asarray(rgba(160, 240))),
    "array-gray": _array(lambda: pattern(300, 200, 8)[..., 0], lambda: np.repeat(pattern(300, 200, 8)[..., :1], 3, -1)),
    "bytes-jpeg": _encoded(lambda: Image.fromarray(pattern(480, 640, 9)), "JPEG"),
}


# ----------------------------------------------------------------------------- reference


@pytest.fixture(scope="module")
def processors(checkpoints):
    """family -> (transformers PIL-backend image processor, our ImageConfig) of the tiny checkpoint."""
    from transformers import AutoProcessor

    out = {}
    for fam, path in checkpoints.items():
        ip = AutoProcessor.from_pretrained(path).image_processor
        assert ip.backend == "pil" and type(ip).__name__.endswith("Pil"), type(ip).__name__
        out[fam] = (ip, ImageConfig.from_export(path))
    return out


def reference(ip, image) -> tuple[np.ndarray, tuple[int, int] | None]:
    """transformers' pixel_values [N, 3, H, W] (and image size for anyres) for one image."""
    out = ip(images=image, return_tensors="np")
    pixels = out["pixel_values"]
    if "image_sizes" in out:
        return pixels[0], tuple(int(v) for v in out["image_sizes"][0])
    return pixels, None


def hf_grid(image_size, cfg: ImageConfig) -> tuple[int, int]:
    """The grid transformers' model uses to unpack the tiles."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return tuple(get_anyres_image_grid_shape(image_size, [list(p) for p in cfg.image_grid_pinpoints], cfg.patch_size))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fam", list(MODES))
def test_matches_transformers(fam, case, processors, photos, tmp_path):
    ip, cfg = processors[fam]
    source, ref_input = CASES[case](tmp_path, photos)
    ref, ref_size = reference(ip, ref_input)
    got = preprocess(source, cfg, MODES[fam])

    assert got.pixel_values.dtype == np.float32 and got.pixel_values.flags.c_contiguous
    assert got.pixel_values.shape == ref.shape
    assert float(np.abs(got.pixel_values - ref).max()) <= TOLERANCE
    ref_img = ref_input if isinstance(ref_input, Image.Image) else Image.fromarray(np.asarray(ref_input))
    assert got.image_size == (ref_img.height, ref_img.width)
    if MODES[fam] == "anyres":
        assert got.image_size == ref_size
        assert got.grid == hf_grid(got.image_size, cfg)
        assert len(got.pixel_values) == 1 + got.grid[0] * got.grid[1]
    else:
        assert got.grid == (1, 1) and len(got.pixel_values) == 1


@pytest.mark.parametrize("pinpoint", DEFAULT_PINPOINTS)
def test_every_pinpoint_shape(pinpoint, processors):
    ip, cfg = processors["llava-next"]
    assert cfg.image_grid_pinpoints == DEFAULT_PINPOINTS
    h, w = pinpoint
    for size in [(h, w), (h - 20, w - 40), (h * 3 // 2, w * 3 // 2)]:  # exact, padded, downscaled
        assert best_resolution(size, cfg.image_grid_pinpoints) == pinpoint
        got = preprocess(pattern(*size, seed=h + w), cfg, "anyres")
        assert got.grid == (h // 336, w // 336) == hf_grid(size, cfg)
        assert got.pixel_values.shape == (1 + (h // 336) * (w // 336), 3, 336, 336)
        np.testing.assert_array_equal(got.pixel_values, reference(ip, pattern(*size, seed=h + w))[0])


@pytest.mark.parametrize("shape", [(336, 672), (672, 336)])
def test_tile_order_row_major(shape, processors):
    """First half red, second half blue (left/right or top/bottom): tile 1 red, tile 2 blue."""
    _, cfg = processors["llava-next"]
    a = np.zeros(shape + (3,), np.uint8)
    if shape[1] > shape[0]:
        a[:, :336, 0], a[:, 336:, 2] = 255, 255
    else:
        a[:336, :, 0], a[336:, :, 2] = 255, 255
    pv = preprocess(a, cfg, "anyres").pixel_values
    red, blue = pv[1].mean(axis=(1, 2)), pv[2].mean(axis=(1, 2))
    assert red[0] > 1.5 and red[2] < -1.0 and blue[2] > 1.5 and blue[0] < -1.0


def test_16bit_not_clipped(processors):
    """transformers lets PIL clip 16-bit values at 255 (a near-white image); we keep the high byte."""
    ip, cfg = processors["llava"]
    data, _ = _sixteen_bit(None, None)
    got = np.asarray(load_image(data))
    assert got[0].max() < 10 and got[-1].min() > 245  # the full top-to-bottom gradient survives
    clipped = reference(ip, _opened(data))[0]
    assert not np.array_equal(preprocess(data, cfg, "clip").pixel_values, clipped)


def test_rgba_composited_on_white():
    img = load_image(encode(rgba(30, 90)))
    a = np.asarray(img)
    assert img.mode == "RGB" and (a[:, :30] == 255).all()  # fully transparent -> white, not black


def test_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution

    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 3000, (300, 2)):
        assert best_resolution((h, w), DEFAULT_PINPOINTS) == tuple(select_best_resolution((h, w), DEFAULT_PINPOINTS))


# ----------------------------------------------------------------------------- config


def test_config_from_either_file(checkpoints, tmp_path):
    for path in checkpoints.values():
        old = ImageConfig.from_dict(json.loads((path / "preprocessor_config.json").read_text()))
        new = ImageConfig.from_dict(json.loads((path / "processor_config.json").read_text()))
        assert old == new
        shutil.copy(path / "processor_config.json", tmp_path / "processor_config.json")
        assert ImageConfig.from_export(tmp_path) == old
    assert ImageConfig.from_export(checkpoints["llava-next"]).size == {"shortest_edge": 336}
    assert ImageConfig.from_export(checkpoints["llava-next"]).patch_size == 336


def test_config_missing(tmp_path):
    with pytest.raises(ModelNotFoundError, match="preprocessor_config.json"):
        ImageConfig.from_export(tmp_path)




def test_module_is_torch_free():
    code = "import sys, llava_ov.runtime.image; bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- loading errors


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _ico_with_big_png() -> bytes:
    """An ICO whose directory claims 16x16 but whose entry is a 2000x2000 PNG (Pillow decodes it on open)."""
    import struct

    png = encode(Image.new("RGB", (2000, 2000)))
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def _truncated_png() -> bytes:
    data = encode(Image.fromarray(pattern(200, 200)))
    return data[: len(data) // 2]


ERRORS = {
    "missing-file": (lambda tmp: tmp / "nope.png", {}, "not found"),
    "directory": (lambda tmp: tmp, {}, "not an image file"),
    "zero-bytes": (lambda tmp: b"", {}, "empty"),
    "empty-file": (lambda tmp: _write(tmp / "e.png", b""), {}, "empty"),
    "corrupt-bytes": (lambda tmp: b"this is not an image " * 20, {}, "not a supported image"),
    "ico-hiding-a-big-png": (lambda tmp: _ico_with_big_png(), {"max_pixels": 1_000_000}, "not a supported image"),
    "eps": (lambda tmp: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", {}, "not a supported image"),
    "truncated-png": (lambda tmp: _truncated_png(), {}, "truncated"),
    "bomb-pillow-limit": (lambda tmp: png_header_only(100_000, 100_000), {}, "decompression bomb"),
    "bomb-own-limit": (lambda tmp: png_header_only(4000, 3000), {"max_pixels": 10_000_000}, "decompression bomb"),
    "over-max-bytes": (lambda tmp: encode(Image.fromarray(pattern(64, 64))), {"max_bytes": 1000}, "over the limit"),
    "over-max-bytes-file": (
        lambda tmp: _write(tmp / "big.png", encode(Image.fromarray(pattern(64, 64)))),
        {"max_bytes": 1000},
        "over the limit",
    ),
    "array-too-many-pixels": (lambda tmp: np.zeros((200, 200, 3), np.uint8), {"max_pixels": 1000}, "pixels"),
    "array-bad-shape": (lambda tmp: np.zeros((5, 5, 2), np.uint8), {}, "shape"),
    "array-bad-range": (lambda tmp: np.full((5, 5, 3), 2.0), {}, r"\[0, 1\]"),
    "array-bad-dtype": (lambda tmp: np.zeros((5, 5, 3), np.int64), {}, "dtype"),
    "wrong-type": (lambda tmp: 42, {}, "unsupported image source"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_invalid_images(case, tmp_path):
    make, kwargs, expected = ERRORS[case]
    with pytest.raises(InvalidImageError, match=expected) as info:
        load_image(make(tmp_path), **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg and len(msg) < 300
    assert info.value.__suppress_context__ or info.value.__cause__ is None  # no chained traceback to print


def test_only_allowed_formats_are_opened(monkeypatch):
    """Formats outside the allow-list never reach a Pillow plugin (an ICO decodes its PNG on open)."""
    opened = []
    real_open = Image.open

    def spy(fp, mode="r", formats=None):
        opened.append(formats)
        return real_open(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy)
    with pytest.raises(InvalidImageError, match="not a supported image"):
        load_image(_ico_with_big_png(), max_pixels=1_000_000)
    assert opened and all(f is not None and "ICO" not in f and "EPS" not in f for f in opened)
    assert load_image(encode(Image.fromarray(pattern(20, 30)), "WEBP")).size == (30, 20)


def test_header_checked_before_decoding(monkeypatch):
    """A bomb over our limit is refused without Image.load ever running."""
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a refused image"))
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        load_image(png_header_only(4000, 3000), max_pixels=10_000_000)
