"""Reading user-given files within a byte limit: the image and video loaders share it."""

from __future__ import annotations

from pathlib import Path

from llava_ov.errors import LlavaOvError


def check_size(n: int, max_bytes: int, what: str, error: type[LlavaOvError]) -> None:
    """Refuse empty and oversize inputs: `error("<what> is ...")`."""
    if n == 0:
        raise error(f"{what} is empty (0 bytes)")
    if n > max_bytes:
        raise error(f"{what} is {n:,} bytes, over the limit of {max_bytes:,} bytes")


def read_bounded(source: str | Path, max_bytes: int, what: str, error: type[LlavaOvError]) -> bytes:
    """The bytes of a file, refusing missing, non-file and oversize paths before reading them (and reading at
    most max_bytes + 1: the file may grow after the size check)."""
    path = Path(source)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror or e}") from None
    if not path.is_file():
        raise error(f"not {'an' if what[0] in 'aeiou' else 'a'} {what} file: {path}")
    check_size(size, max_bytes, what, error)
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror or e}") from None
    check_size(len(data), max_bytes, what, error)
    return data


def check_pixels(width: int, height: int, max_pixels: int, what: str, error: type[LlavaOvError]) -> None:
    """Refuse a declared size with no pixels, or more pixels than allowed (decompression bombs)."""
    if width <= 0 or height <= 0:
        raise error(f"{what} has no frame size ({width}x{height})")
    if width * height > max_pixels:
        raise error(f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                    "pixels (possible decompression bomb)")  # fmt: skip
