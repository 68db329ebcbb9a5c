"""The video stage of the runtime: open a video safely, sample frame indices, decode the sampled frames.

A video is a file, its bytes, or a list of frames (each anything `load_image` takes). Files are
opened with PyAV (FFmpeg) from memory and checked before any frame is decoded, with the standards
of image.py: bounded in bytes before reading, then the container and codec against allow-lists
(passed to FFmpeg as its format and codec whitelists, so no other demuxer or decoder ever runs on
the data), then the declared frame size, frame count, duration and pixels to decode. Frames are
then decoded one at a time, the time limit and the caller's cancel checked at every packet and
frame, the frame size limit enforced by the decoder itself too (FFmpeg's max_pixels).

Frame i is the i-th frame the decoder outputs: what transformers' PyAV (and decord) readers give.
Seeking to the keyframe before a frame is used only where it gives that same frame: an indexed
container (mp4/mov, mkv/webm) whose packets are exactly its declared frames at a constant rate,
checked again frame by frame while decoding; anything else, or any surprise, decodes from the start.

PyAV is imported only when a file is opened.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import re
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from llava_ov.common.files import check_pixels, check_size, read_bounded
from llava_ov.errors import InvalidImageError, InvalidVideoError, LlavaOvError, require_extra
from llava_ov.runtime.image import ImageSource, load_image

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

# FFmpeg demuxers opened ("mov" reads mp4/mov/m4v/3gp, "matroska" mkv/webm); any other is refused after probing.
VIDEO_CONTAINERS = ("mov", "matroska", "avi", "gif")
# What phones, cameras, browsers and screen recorders write (h263: old 3GP phone clips). Not lossless, raw or
# production codecs (ffv1, prores, ...): rare in what users send, and every decoder is more attack surface.
VIDEO_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "h263", "mjpeg", "gif")
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".3gp", ".3g2", ".mkv", ".webm", ".avi"})  # .gif: an image
VIDEO_MIME_TYPES = frozenset({"video/mp4", "video/x-m4v", "video/quicktime", "video/3gpp", "video/3gpp2", "video/webm",
                              "video/x-matroska", "video/matroska", "video/x-msvideo", "video/avi", "video/msvideo",
                              "image/gif"})  # fmt: skip
SEEKING_CONTAINERS = ("mov", "matroska")  # indexed: a seek lands on the keyframe asked for
_ALLOWED = "mp4/mov, mkv/webm, avi or gif"
_HARDWARE = 1 << 18 | 1 << 19  # AV_CODEC_CAP_HARDWARE | AV_CODEC_CAP_HYBRID: GPU/driver decoders are not used

_Packet = tuple[int | None, bool, bool]  # a demuxed packet's pts, keyframe flag, discard flag
VideoSource = Union[str, Path, bytes, bytearray, memoryview, Sequence[ImageSource]]
FRAME_FILE_BYTES = 50_000_000  # a frame file's size limit: load_image's default
_FRAME_TYPES = (str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray)


@dataclass(frozen=True)
class VideoLimits:
    """What a video may be: checked on what the file declares before any frame is decoded (max_decode_s while
    decoding). A list of frames is held to max_frames and max_decode_s; each frame to load_image's limits."""

    max_bytes: int = 256 * 2**20
    max_duration_s: float = 600.0  # declared duration (the longer of the container's and the stream's)
    max_frames: int = 9_000  # declared frame count, or duration x frame rate where the container has none
    max_frame_pixels: int = 4096 * 2304  # declared width x height (resolution bombs); the decoder refuses more too
    max_total_pixels: int = 9_000 * 1920 * 1088  # frames x width x height: a full decode's work (small-file bombs)
    max_decode_s: float = 60.0  # time spent decoding one frames() call (not the time its caller spends between frames)


@dataclass(frozen=True)
class VideoInfo:
    """What an opened video declares (checked against VideoLimits)."""

    frames: int  # total frame count (declared, or computed from duration * fps when the container lacks it)
    fps: float | None
    duration_s: float | None
    width: int
    height: int
    container: str  # FFmpeg demuxer: mov (mp4/mov/3gp), matroska (mkv/webm), avi, gif; "frames" for a frame list
    codec: str  # h264, hevc, ...; "images" for a frame list


class VideoCancelled(LlavaOvError):
    """Decoding stopped because the caller cancelled."""


# ----------------------------------------------------------------------------- sampling


def sample_indices(
    total: int, num_frames: int | None = None, fps: float | None = None, video_fps: float | None = None
) -> np.ndarray:
    """Uniformly sampled frame indices, as transformers' default_sample_indices_fn (video_utils.py).

    num_frames frames, or int(total / video_fps * fps) (at least 1) with fps; all frames with neither.
    One difference: more frames than the video has means every frame (transformers raises).
    """
    if num_frames is not None and fps is not None:
        raise InvalidVideoError("sample a video by num_frames or by fps, not both")
    if total < 1:
        raise InvalidVideoError("the video has no frames")
    if fps is not None:
        if not fps > 0:
            raise InvalidVideoError(f"fps must be positive, not {fps}")
        if not video_fps:
            raise InvalidVideoError("sampling by fps needs the video's frame rate, and this video declares none")
        num_frames = max(1, int(total / video_fps * fps))
    if num_frames is None:
        return np.arange(total, dtype=int)
    if num_frames < 1:
        raise InvalidVideoError(f"num_frames must be at least 1, not {num_frames}")
    num_frames = min(num_frames, total)
    return np.arange(num_frames, dtype=int) * total // num_frames


def _targets(indices: Sequence[int], total: int) -> list[int]:
    """Indices sorted and unique, each in [0, total)."""
    targets = sorted({int(i) for i in indices})
    if targets and (targets[0] < 0 or targets[-1] >= total):
        raise ValueError(f"frame indices must be in [0, {total}); got {targets[0]}..{targets[-1]}")
    return targets


# ----------------------------------------------------------------------------- the opened video


class _Budget:
    """The caller's cancel, and the time spent decoding (only while the decoder runs) against the limit."""

    def __init__(self, limit_s: float, cancel: Callable[[], bool] | None):
        self.limit_s, self.cancel = limit_s, cancel
        self.spent, self.since = 0.0, time.monotonic()

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise VideoCancelled("video decoding was cancelled")
        if self.spent + time.monotonic() - self.since > self.limit_s:
            raise InvalidVideoError(f"decoding the video took longer than the limit of {self.limit_s:g} s")

    def pause(self) -> None:
        self.spent += time.monotonic() - self.since

    def resume(self) -> None:
        self.since = time.monotonic()


class Video:
    """An opened, checked video; nothing decoded yet. A context manager (close)."""

    info: VideoInfo
    digest_seed: str  # cheap content identity of the source (a blake2b digest): half of a feature-cache key

    def __init__(self, info: VideoInfo, limits: VideoLimits):
        self.info, self.limits = info, limits
        self._closed = False

    def frames(self, indices: Sequence[int], cancel: Callable[[], bool] | None = None) -> Iterator[Image.Image]:
        """The RGB frames at these indices (sorted, unique), one at a time, in order.

        Frame i is the i-th frame the decoder outputs. `cancel()` true stops with VideoCancelled, and
        decoding longer than max_decode_s with InvalidVideoError (both checked at every packet and frame);
        so does a video that ends before a requested frame.
        """
        if self._closed:
            raise ValueError("the video is closed")
        targets = _targets(indices, self.info.frames)
        budget = _Budget(self.limits.max_decode_s, cancel)
        decoding = self._decode(targets, budget)
        try:
            for image in decoding:
                budget.pause()
                yield image
                budget.resume()
        finally:
            decoding.close()

    def _decode(self, targets: list[int], budget: _Budget) -> Generator[Image.Image, None, Any]:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class _SeekIndex:
    """A constant-rate stream whose packets are exactly its frames: frame i shows at pts[i]."""

    pts: list[int]  # every frame's timestamp, ascending
    keys: list[int]  # the keyframes' frame indices, ascending (keys[0] == 0)
    key_at: dict[int, int]  # keyframe timestamp -> frame index

    def key_before(self, i: int) -> int:
        return self.keys[bisect.bisect_right(self.keys, i) - 1]

    def saves(self, targets: list[int]) -> bool:
        """Whether seeking skips any frame sequential decoding would decode."""
        return any(self.key_before(t) > previous + 1 for previous, t in zip([-1, *targets[:-1]], targets, strict=True))


class _EncodedVideo(Video):
    """A video file's bytes, decoded with PyAV."""

    def __init__(
        self, data: bytes, container: InputContainer, stream_index: int, info: VideoInfo, limits: VideoLimits,
        packets: list[_Packet] | None = None,
    ):  # fmt: skip
        super().__init__(info, limits)
        self._data, self._probe, self._stream_index = data, container, stream_index
        self._packets = packets  # the demux pass made at open (indexed containers), for seeking

    @cached_property
    def digest_seed(self) -> str:
        return hashlib.blake2b(self._data, digest_size=16).hexdigest()

    def close(self) -> None:
        super().close()
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def _container(self) -> InputContainer:
        """The probe's container for the first use, a new one from the bytes after that."""
        container, self._probe = self._probe, None
        return container if container is not None else _open_container(self._data, self.limits)

    def _stream(self, container: InputContainer) -> VideoStream:
        stream = container.streams[self._stream_index]
        stream.codec_context.options = {"max_pixels": str(self.limits.max_frame_pixels)}
        return stream

    def _decode(self, targets: list[int], budget: _Budget) -> Generator[Image.Image, None, None]:
        if not targets:
            return
        index = self._seek_index(targets)
        if index is not None and index.saves(targets):
            done = yield from self._seeking(targets, index, budget)
            targets = targets[done:]
        if targets:
            yield from self._sequential(targets, budget)

    def _sequential(self, targets: list[int], budget: _Budget) -> Generator[Image.Image, None, None]:
        """Decode from the start, counting frames."""
        container, position, k = self._container(), -1, 0
        try:
            decoded = _Decoded(container, self._stream(container), budget)
            for position, frame in enumerate(decoded):
                if position == targets[k]:
                    image = self._image(frame, position)
                    del frame
                    yield image
                    k += 1
                    if k == len(targets):
                        return
        finally:
            container.close()
        raise InvalidVideoError(
            f"the video has only {position + 1:,} decodable frames of the {self.info.frames:,} it declares "
            f"(frame {targets[k]:,} was asked for): truncated or corrupt"
            + (f"; {decoded.error}" if decoded.error else "")
        )

    def _seeking(self, targets: list[int], index: _SeekIndex, budget: _Budget) -> Generator[Image.Image, None, int]:
        """Seek to the keyframe before each target that decoding on would not reach soon; returns how many targets
        it gave, stopping at the first frame that is not the one the index expects (sequential decoding then)."""
        container = self._container()
        try:
            stream = self._stream(container)
            frames, position = iter(_Decoded(container, stream, budget)), None
            for done, target in enumerate(targets):
                key = index.key_before(target)
                if position is not None and key > position + 1:
                    frames.close()
                    if not _seek(container, stream, index.pts[key]):
                        return done
                    frames, position = iter(_Decoded(container, stream, budget)), None
                position = yield from self._seek_to(frames, position, target, index)
                if position != target:
                    return done
            return len(targets)
        finally:
            container.close()

    def _seek_to(
        self, frames: Iterator[VideoFrame], position: int | None, target: int, index: _SeekIndex
    ) -> Generator[Image.Image, None, int]:
        """Decode on to `target` (yielding it); the position reached, or -1 where a frame was not the one expected.
        position None: just after a seek, where the first frame must be a keyframe."""
        for frame in frames:
            if position is None:
                position = index.key_at.get(frame.pts, -1)
            else:
                position += 1
                position = position if position < len(index.pts) and frame.pts == index.pts[position] else -1
            if position < 0 or position > target or frame.is_corrupt:
                return -1
            if position == target:
                image = self._image(frame, position)
                del frame
                yield image
                return position
        return -1

    def _seek_index(self, targets: list[int]) -> _SeekIndex | None:
        """The packets' timestamps, where seeking provably gives the frames sequential decoding would; else None."""
        if self._packets is None or len(targets) == self.info.frames:
            return None
        if any(pts is None or discarded for pts, _, discarded in self._packets):
            return None
        return _seek_index([(pts, key) for pts, key, _ in self._packets], self.info.frames)

    def _image(self, frame: VideoFrame, i: int) -> Image.Image:
        width, height, limit = frame.width, frame.height, self.limits.max_frame_pixels
        if width * height > limit:
            raise InvalidVideoError(f"frame {i:,} is {width}x{height}, over the limit of {limit:,} pixels")
        try:
            return frame.to_image()
        except Exception as e:
            raise InvalidVideoError(f"cannot convert video frame {i:,} to RGB: {_av_message(e)}") from None


def _seek(container: InputContainer, stream: VideoStream, pts: int) -> bool:
    """Seek to the keyframe at pts (decoders flushed); False where the demuxer could not."""
    try:
        container.seek(pts, stream=stream)
    except Exception:  # av.error.*: decode from the start instead
        return False
    return True


def _seek_index(packets: list[tuple[int, bool]], frames: int) -> _SeekIndex | None:
    """The index of a constant-rate stream whose packets are exactly its frames, else None.

    Its first packet must be a keyframe shown first: frames before it are ones sequential decoding
    may drop (open GOPs, cut streams), which would shift every index.
    """
    if len(packets) != frames or not packets[0][1]:
        return None
    pts = sorted(p for p, _ in packets)
    steps = np.diff(pts)
    if pts[0] != packets[0][0] or (len(steps) and (steps.min() < 1 or steps.max() - steps.min() > 1)):
        return None  # frames before the first keyframe, duplicate timestamps, or a variable rate (1 tick: rounding)
    rank = {p: i for i, p in enumerate(pts)}
    keys = sorted(rank[p] for p, key in packets if key)
    return _SeekIndex(pts, keys, {pts[k]: k for k in keys})


class _Decoded:
    """Every frame the decoder outputs from the container's position, the budget checked at each packet and frame.

    Ends at the end of the data or at the first packet FFmpeg cannot read or decode (`error` then says why),
    after the frames the decoder still holds: what a truncated file has.
    """

    def __init__(self, container: InputContainer, stream: VideoStream, budget: _Budget):
        self.container, self.stream, self.budget = container, stream, budget
        self.error: str | None = None

    def __iter__(self) -> Iterator[VideoFrame]:
        packets = self.container.demux(self.stream)
        while True:
            self.budget.check()
            try:
                packet = next(packets, None)
                frames = self.stream.decode(packet) if packet is not None else []
            except Exception as e:  # av.error.*, MemoryError, ...: the data is bad from here on
                self.budget.check()  # a read that ran out of time (FFmpeg's interrupt) is the time limit
                self.error, packet, frames = _av_message(e), None, self._flush()
            for frame in frames:
                self.budget.check()
                yield frame
            if packet is None:
                return

    def _flush(self) -> list[VideoFrame]:
        try:
            return self.stream.decode(None)
        except Exception:  # nothing more to get
            return []


# ----------------------------------------------------------------------------- a list of frames


class _FrameListVideo(Video):
    """A video given as its frames; each loaded (with load_image's checks) when asked for."""

    def __init__(self, items: list, limits: VideoLimits):
        first = _load_frame(items, 0)
        super().__init__(VideoInfo(len(items), None, None, first.width, first.height, "frames", "images"), limits)
        self._items = items

    @cached_property
    def digest_seed(self) -> str:
        h = hashlib.blake2b(digest_size=16, person=b"frames")
        for i, item in enumerate(self._items):
            h.update(_frame_digest(item, i))
        return h.hexdigest()

    def _decode(self, targets: list[int], budget: _Budget) -> Generator[Image.Image, None, None]:
        for i in targets:
            budget.check()
            yield _load_frame(self._items, i)


def _load_frame(items: list, i: int) -> Image.Image:
    try:
        return load_image(items[i])
    except InvalidImageError as e:
        raise InvalidVideoError(f"frame {i:,} of the video: {e}") from None


def _frame_digest(item: Any, i: int) -> bytes:
    """A frame's content digest: a file's or buffer's bytes, an array's or image's pixels."""
    if isinstance(item, (str, Path)):  # a regular file within the image byte limit: no /dev/zero, no huge reads
        try:
            return hashlib.blake2b(read_bounded(item, FRAME_FILE_BYTES, "image", InvalidImageError)).digest()
        except InvalidImageError as e:
            raise InvalidVideoError(f"frame {i:,} of the video: {e}") from None
    if isinstance(item, (bytes, bytearray, memoryview)):
        return hashlib.blake2b(item).digest()
    if isinstance(item, np.ndarray):
        return hashlib.blake2b(
            np.ascontiguousarray(item).tobytes(), person=f"{item.shape}{item.dtype}"[:16].encode()
        ).digest()
    image = _load_frame([item], 0)
    return hashlib.blake2b(image.tobytes(), person=str(image.size).encode()[:16]).digest()


def _open_frames(items: list, limits: VideoLimits) -> _FrameListVideo:
    if not items:
        raise InvalidVideoError("a video given as frames needs at least one frame")
    if len(items) > limits.max_frames:
        raise InvalidVideoError(f"video has {len(items):,} frames, over the limit of {limits.max_frames:,} frames")
    for i, item in enumerate(items):
        if not isinstance(item, _FRAME_TYPES):
            raise InvalidVideoError(
                f"frame {i:,} of the video is a {type(item).__name__}; frames are paths, bytes, PIL images or arrays"
            )
    return _FrameListVideo(items, limits)


# ----------------------------------------------------------------------------- opening a file


def open_video(source: VideoSource, limits: VideoLimits = VideoLimits()) -> Video:
    """A video file, its bytes, or a list of frames, opened and checked without decoding a frame.

    InvalidVideoError (one line, naming the limit) for anything missing, unsupported, corrupt or over a limit.
    """
    if isinstance(source, (str, Path)):
        return _open_encoded(_read_source(source, limits.max_bytes), limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        _check_bytes(source.nbytes if isinstance(source, memoryview) else len(source), limits.max_bytes)
        return _open_encoded(bytes(source), limits)
    if isinstance(source, Sequence) or (isinstance(source, np.ndarray) and source.ndim == 4):
        return _open_frames(list(source), limits)
    raise InvalidVideoError(f"unsupported video source of type {type(source).__name__}")


def _read_source(source: str | Path, max_bytes: int) -> bytes:
    return read_bounded(source, max_bytes, "video", InvalidVideoError)


def _check_bytes(n: int, max_bytes: int) -> None:
    check_size(n, max_bytes, "video", InvalidVideoError)


def _open_encoded(data: bytes, limits: VideoLimits) -> _EncodedVideo:
    container = _open_container(data, limits)
    try:
        stream = _video_stream(container)
        info = _checked_info(container, stream, limits)
    except BaseException:
        container.close()
        raise
    packets = _scan_packets(data, stream.index, info.frames, limits) if info.container in SEEKING_CONTAINERS else None
    info = replace(info, frames=_shown_frames(packets, info))
    return _EncodedVideo(data, container, stream.index, info, limits, packets)


def _scan_packets(data: bytes, stream_index: int, declared: int, limits: VideoLimits) -> list[_Packet] | None:
    """Every non-empty video packet's (pts, keyframe, discarded), demuxed once at open (no decoding); None when
    the demux fails, runs past the time limit, or finds more packets than declared (then sequential decoding
    counts the frames as they come, and says what is wrong)."""
    container, packets = _open_container(data, limits), []
    budget = _Budget(limits.max_decode_s, None)
    try:
        for packet in container.demux(container.streams[stream_index]):
            budget.check()
            if packet.size:
                packets.append((packet.pts, packet.is_keyframe, packet.is_discard))
                if len(packets) > declared:
                    return None
    except Exception:
        return None
    finally:
        container.close()
    return packets


def _shown_frames(packets: list[_Packet] | None, info: VideoInfo) -> int:
    """The frames an mp4/mkv shows: its packets that are not discarded.

    What the container declares can be more: a stream-copied cut keeps its edit list's discarded packets in
    mp4's count, and a variable-rate mkv/webm has duration x nominal rate. Sampling by the declared count
    would then ask for frames that never come. An mp4 with fewer packets than its count is cut short: the
    declared count stays, and decoding says the file is truncated."""
    if packets is None:
        return info.frames
    shown = sum(not discarded for _, _, discarded in packets)
    if (info.container == "mov" and len(packets) < info.frames) or shown == 0:
        return info.frames
    return min(shown, info.frames)


def _open_container(data: bytes, limits: VideoLimits) -> InputContainer:
    """PyAV's container for the bytes, opening only the allowed demuxers (and, while probing, decoders)."""
    av = require_extra("av", "video", "video input")

    if av.logging.get_level() is None:  # PyAV's default: keep FFmpeg quiet, but keep its errors for our messages
        av.logging.set_level(av.logging.PANIC)
    whitelists = {"format_whitelist": ",".join(VIDEO_CONTAINERS), "codec_whitelist": _decoders()}
    try:
        return av.open(
            io.BytesIO(data), container_options=whitelists, metadata_errors="ignore", timeout=limits.max_decode_s
        )
    except av.error.ExitError:  # FFmpeg's interrupt: the timeout
        raise InvalidVideoError(f"opening the video took longer than the limit of {limits.max_decode_s:g} s") from None
    except Exception as e:  # av.error.*, MemoryError, ...
        raise _not_opened(e) from None


def _not_opened(e: BaseException) -> InvalidVideoError:
    refused = re.search(r"\[([\w,]+)\] Format not on whitelist", str(e))
    if refused:
        return InvalidVideoError(f"video container {refused.group(1).split(',')[0]!r} is not supported ({_ALLOWED})")
    return InvalidVideoError(f"video data is not a supported video ({_ALLOWED}), or it is corrupt: {_av_message(e)}")


@lru_cache(maxsize=1)
def _decoders() -> str:
    """FFmpeg's software decoders of the allowed codecs (e.g. libdav1d for AV1): its codec whitelist."""
    import av

    names = set()
    for name in av.codecs_available:
        try:
            codec = av.codec.Codec(name, "r")
        except Exception:  # an encoder's name
            continue
        if codec.canonical_name in VIDEO_CODECS and not codec.capabilities & _HARDWARE:
            names.add(codec.name)
    return ",".join(sorted(names))


def _video_stream(container: InputContainer) -> VideoStream:
    """The first video stream that is not a cover picture."""
    from av.stream import Disposition

    fmt = container.format.name.split(",")[0]
    if fmt not in VIDEO_CONTAINERS:  # FFmpeg's whitelist already refused it
        raise InvalidVideoError(f"video container {fmt!r} is not supported ({_ALLOWED})")
    for stream in container.streams.video:
        if not stream.disposition & Disposition.attached_pic:
            return stream
    raise InvalidVideoError("the file has no video stream")


def _checked_info(container: InputContainer, stream: VideoStream, limits: VideoLimits) -> VideoInfo:
    """What the video declares, refused when over a limit."""
    ctx = stream.codec_context
    codec = ctx.codec.canonical_name if ctx is not None else "unknown"
    if codec not in VIDEO_CODECS:
        raise InvalidVideoError(f"video codec {codec!r} is not supported ({', '.join(VIDEO_CODECS)})")
    width, height = ctx.width, ctx.height
    _check_frame_size(width, height, limits.max_frame_pixels)
    fps, (own, longest) = _frame_rate(stream), _durations(container, stream)
    _check_duration(longest, limits.max_duration_s)
    duration = own or longest
    frames = stream.frames if stream.frames > 0 else (round(duration * fps) if duration and fps else 0)
    if frames <= 0:
        raise InvalidVideoError("video declares neither its frame count nor its duration and frame rate")
    if duration is None and fps:
        duration = frames / fps
        _check_duration(duration, limits.max_duration_s)
    _check_frames(frames, width * height, limits)
    return VideoInfo(frames, fps, duration, width, height, container.format.name.split(",")[0], codec)


def _check_duration(seconds: float | None, max_s: float) -> None:
    if seconds is not None and seconds > max_s:
        raise InvalidVideoError(f"video is {seconds:,.1f} s long, over the limit of {max_s:g} s")


def _check_frame_size(width: int, height: int, max_pixels: int) -> None:
    check_pixels(width, height, max_pixels, "a video frame", InvalidVideoError)


def _check_frames(frames: int, pixels: int, limits: VideoLimits) -> None:
    if frames > limits.max_frames:
        raise InvalidVideoError(f"video has {frames:,} frames, over the limit of {limits.max_frames:,} frames")
    if frames * pixels > limits.max_total_pixels:
        raise InvalidVideoError(
            f"video is {frames:,} frames x {pixels:,} pixels = {frames * pixels:,} pixels to decode, over the limit "
            f"of {limits.max_total_pixels:,} (possible decompression bomb)"
        )


def _frame_rate(stream: VideoStream) -> float | None:
    """The average frame rate (transformers' metadata fps), else FFmpeg's guess."""
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else None


def _durations(container: InputContainer, stream: VideoStream) -> tuple[float | None, float | None]:
    """Seconds: the video stream's own declared duration, and the longest declared (stream, tag, or container,
    which may count a longer audio track); None where nothing declares one."""
    own = None
    if stream.duration and stream.duration > 0 and stream.time_base:
        own = float(stream.duration * stream.time_base)
    elif tag := _duration_tag(stream.metadata.get("DURATION", "")):  # Matroska's per-track tag
        own = tag
    known = [d for d in (own, container.duration / 1_000_000 if container.duration else None) if d and d > 0]
    return own, max(known) if known else None


def _duration_tag(text: str) -> float | None:
    """ "HH:MM:SS.fraction" (Matroska's DURATION tag) in seconds."""
    match = re.fullmatch(r"(\d+):(\d{2}):(\d{2}(?:\.\d+)?)", text.strip())
    return int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3]) if match else None


def _av_message(e: BaseException) -> str:
    """PyAV's error as one line: FFmpeg's reason, and its last error log where it kept one."""
    text = str(e).strip().splitlines()
    text = text[0] if text else type(e).__name__
    reason, _, log = text.partition("; last error log: ")
    reason = getattr(e, "strerror", None) or reason
    return f"{reason}: {log.strip()}" if log else reason
