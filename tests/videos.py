"""Small test videos written with PyAV: frames that carry their own index, and hostile files.

Every frame from `index_frame` shows the 16 bits of its index as black/white cells (two rows of
eight), so a decoded frame says which frame it is even after lossy coding (`read_index`).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

BITS = 16


def index_frame(i: int, width: int = 64, height: int = 32) -> np.ndarray:
    """uint8 HxWx3: the bits of i as cells, least significant first, row-major."""
    cells = ((i >> np.arange(BITS)) & 1).reshape(2, BITS // 2).astype(np.uint8) * 255
    a = np.repeat(np.repeat(cells, height // 2, 0), width // (BITS // 2), 1)
    return np.repeat(a[..., None], 3, 2)


def read_index(img: Image.Image | np.ndarray) -> int:
    """The index an `index_frame` frame shows (its cells' centres, thresholded)."""
    a = np.asarray(img)[..., :3].mean(-1)
    ch, cw = a.shape[0] // 2, a.shape[1] // (BITS // 2)
    centres = a[ch // 2 :: ch, cw // 2 :: cw][:2, : BITS // 2]
    return int(((centres.reshape(-1) > 128) << np.arange(BITS)).sum())


def _pix_fmt(codec: str) -> str:
    return {"mjpeg": "yuvj420p", "gif": "rgb8"}.get(codec, "yuv420p")


def write_video(
    path: Path | io.BytesIO,
    n: int = 24,
    *,
    size: tuple[int, int] = (64, 32),
    fps: int | Fraction = 24,
    codec: str = "libx264",
    fmt: str | None = None,
    frame: Callable[[int, int, int], np.ndarray] = index_frame,
    codec_options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
) -> Path | io.BytesIO:
    """Encode n frames `frame(i, width, height)` (RGB uint8) into a file; size is (width, height)."""
    with av.open(path, "w", format=fmt, container_options=container_options or {}) as c:
        s = c.add_stream(codec, rate=fps, options={"preset": "ultrafast"} if codec == "libx264" else {})
        s.width, s.height, s.pix_fmt = size[0], size[1], _pix_fmt(codec)
        if codec_options:
            s.codec_context.options = {**s.codec_context.options, **codec_options}
        for i in range(n):
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame(i, *size), format="rgb24")))
        c.mux(s.encode())
    return path


def video_bytes(n: int = 24, **kw) -> bytes:
    """`write_video` into memory (fmt defaults to mp4)."""
    kw.setdefault("fmt", "mp4")
    return write_video(io.BytesIO(), n, **kw).getvalue()


def repeated(path: Path, n: int, *, size: tuple[int, int], fps: int = 30, codec: str = "libx264") -> Path:
    """n frames of a static picture, encoded once: the second (skip) packet muxed n - 1 times.

    A file of a few KB that declares n full-size frames (the picture, not the decode, is cheap).
    """
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fps, options={"preset": "ultrafast", "bframes": "0"})
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        black = av.VideoFrame.from_ndarray(np.zeros((size[1], size[0], 3), np.uint8), format="rgb24")
        packets = [*s.encode(black), *s.encode(black), *s.encode()]
        first, skip = packets[0], packets[-1]
        step = first.duration or int(1 / (fps * first.time_base))
        c.mux(first)
        for i in range(1, n):
            p = av.Packet(bytes(skip))
            p.stream, p.time_base, p.pts, p.dts, p.duration = s, skip.time_base, i * step, i * step, step
            c.mux(p)
    return path


def gif_bomb(path: Path, width: int, height: int) -> Path:
    """A 2-frame GIF of 1x1 images on a width x height logical screen (the decoder allocates the screen)."""
    buf = io.BytesIO()
    frames = [Image.new("P", (1, 1), i) for i in range(2)]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", width, height)
    path.write_bytes(bytes(data))
    return path


def patch_mp4_size(data: bytes, width: int, height: int, fourcc: bytes = b"avc1") -> bytes:
    """An mp4 whose sample entry (stsd) and track header (tkhd) declare width x height."""
    b = bytearray(data)
    entry = b.index(fourcc)  # the sample entry's type; width/height (u16) follow 24 bytes of fields
    b[entry + 28 : entry + 32] = struct.pack(">HH", width, height)
    tkhd = b.index(b"tkhd")  # version 0: width/height are the last 8 bytes (16.16 fixed point) of 84
    b[tkhd + 80 : tkhd + 88] = struct.pack(">II", width << 16, height << 16)
    return bytes(b)


def two_frames_apart(path: Path, seconds: int, *, size: tuple[int, int] = (16, 16)) -> Path:
    """Two frames `seconds` apart: a file of a few hundred bytes that declares that long a duration."""
    with av.open(path, "w") as c:
        s = c.add_stream("mjpeg", rate=1)
        s.width, s.height, s.pix_fmt, s.time_base = size[0], size[1], "yuvj420p", Fraction(1, 1)
        for pts in (0, seconds):
            f = av.VideoFrame.from_ndarray(index_frame(pts % 2, *size), format="rgb24")
            f.pts, f.time_base = pts, Fraction(1, 1)
            c.mux(s.encode(f))
        c.mux(s.encode())
    return path


def _bits(data: bytearray, start: int):
    """A reader/writer of big-endian bit fields from bit offset `start` of data."""
    pos = start

    def field(n: int, value: int | None = None) -> int:
        nonlocal pos
        old = 0
        for k in range(n):
            byte, shift = divmod(pos + k, 8)
            mask = 0x80 >> shift
            old = old << 1 | bool(data[byte] & mask)
            if value is not None:
                data[byte] = data[byte] | mask if value >> (n - 1 - k) & 1 else data[byte] & ~mask
        pos += n
        return old

    return field


def patch_mpeg4_size(data: bytes, width: int, height: int) -> bytes:
    """MPEG-4 Part 2 video whose VOL headers (bitstream) and mp4v sample entry declare width x height (< 8192)."""
    b, pos = bytearray(data), 0
    while (pos := b.find(b"\x00\x00\x01\x20", pos) + 4) >= 4:  # video_object_layer_start_code
        f = _bits(b, pos * 8)
        f(1), f(8)  # random_accessible_vol, video_object_type_indication
        if f(1):  # is_object_layer_identifier: verid, priority
            f(4), f(3)
        if f(4) == 15:  # aspect_ratio_info: extended PAR
            f(16)
        if f(1):  # vol_control_parameters: chroma_format, low_delay, vbv_parameters (79 bits)
            f(3), f(79) if f(1) else None
        if f(2) != 0:
            raise ValueError("only rectangular VOLs are patched")
        f(1)
        resolution = f(16)
        f(1)
        if f(1):  # fixed_vop_rate
            f(max(1, (resolution - 1).bit_length()))
        f(1), f(13, width), f(1), f(13, height)
    return patch_mp4_size(bytes(b), width, height, b"mp4v") if b"mp4v" in b else bytes(b)


def variable_rate(path: Path, n: int = 30, *, size: tuple[int, int] = (64, 32)) -> Path:
    """n index frames whose durations vary (1 or 2 ticks of 1/30 s): a variable-frame-rate file."""
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=30, options={"preset": "ultrafast", "g": "5"})
        s.width, s.height, s.pix_fmt, s.time_base = size[0], size[1], "yuv420p", Fraction(1, 30)
        pts = 0
        for i in range(n):
            f = av.VideoFrame.from_ndarray(index_frame(i, *size), format="rgb24")
            f.pts, f.time_base = pts, Fraction(1, 30)
            pts += 1 + i % 2
            c.mux(s.encode(f))
        c.mux(s.encode())
    return path


def with_audio(path: Path, n: int = 24, *, seconds: float = 1.0, size: tuple[int, int] = (64, 32)) -> Path:
    """n index frames at 24 fps and `seconds` of AAC silence (the container from the path's suffix)."""
    with av.open(path, "w") as c:
        v = c.add_stream("libx264", rate=24, options={"preset": "ultrafast"})
        v.width, v.height, v.pix_fmt = size[0], size[1], "yuv420p"
        a = c.add_stream("aac", rate=48000)
        for i in range(n):
            c.mux(v.encode(av.VideoFrame.from_ndarray(index_frame(i, *size), format="rgb24")))
        for k in range(int(48000 * seconds) // 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, k * 1024
            c.mux(a.encode(frame))
        c.mux(v.encode())
        c.mux(a.encode())
    return path


def size_change(path: Path, sizes: list[tuple[int, int]]) -> Path:
    """An MJPEG AVI whose frame i has size sizes[i] (JPEG frames are independent); headers declare the first size."""
    with av.open(path, "w") as c:
        s = c.add_stream("mjpeg", rate=1)
        s.width, s.height, s.pix_fmt = sizes[0][0], sizes[0][1], "yuvj420p"
        for i, (w, h) in enumerate(sizes):
            enc = av.CodecContext.create("mjpeg", "w")
            enc.width, enc.height, enc.pix_fmt, enc.time_base = w, h, "yuvj420p", Fraction(1, 1)
            frame = av.VideoFrame.from_ndarray(index_frame(i, w, h), format="rgb24")
            frame.pts = i
            for p in [*enc.encode(frame), *enc.encode(None)]:
                p.stream, p.pts, p.dts, p.time_base = s, i, i, Fraction(1, 1)
                c.mux(p)
    return path
