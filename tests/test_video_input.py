"""runtime/video.py: opening videos safely, sampling indices as transformers does, decoding the sampled frames.

Reference: transformers' default_sample_indices_fn for the indices, and sequential PyAV decoding (what
transformers' read_video_pyav does) for the frames: pixel-equal, whether Video.frames seeks or not.
Every hostile file is refused with InvalidVideoError within 5 s and 300 MB of memory growth.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import psutil
import pytest
from PIL import Image
from transformers.video_utils import VideoMetadata, default_sample_indices_fn

import videos
from llava_ov.errors import InvalidVideoError
from llava_ov.runtime import video as video_module
from llava_ov.runtime.video import VideoCancelled, VideoLimits, open_video, sample_indices

SIZE = (64, 32)  # (width, height) of the index frames


def reference_frames(path: Path, indices: list[int]) -> dict[int, np.ndarray]:
    """Frames by sequential PyAV decoding, counted as transformers' read_video_pyav counts them."""
    wanted, out = set(indices), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    return out


@contextmanager
def bounded(seconds: float = 5.0, mb: float = 300.0):
    """The block must finish within `seconds` and grow the process's RSS by at most `mb` (sampled every ms)."""
    proc = psutil.Process()
    before = peak = proc.memory_info().rss
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            stop.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()
    assert elapsed <= seconds, f"took {elapsed:.2f} s"
    assert (max(peak, proc.memory_info().rss) - before) / 2**20 <= mb, f"RSS grew {(peak - before) / 2**20:.0f} MB"


def refused(source, match: str, limits: VideoLimits = VideoLimits()) -> InvalidVideoError:  # noqa: B008 (frozen)
    """Opening (and, if it opens, decoding 8 sampled frames of) `source` is refused, quickly, in one line."""
    with bounded(), pytest.raises(InvalidVideoError, match=match) as caught, open_video(source, limits) as video:
        list(video.frames(sample_indices(video.info.frames, 8)))
    assert "\n" not in str(caught.value)
    return caught.value


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("total, n", [(1, 1), (10, 1), (10, 3), (10, 10), (30, 8), (31, 8), (300, 32), (901, 16)])
def test_sample_indices_num_frames_match_transformers(total, n):
    expected = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=30.0), num_frames=n)
    np.testing.assert_array_equal(sample_indices(total, n), expected)


@pytest.mark.parametrize("total, video_fps, fps", [(300, 30.0, 1), (300, 30.0, 2.5), (10, 30.0, 1), (95, 29.97, 4),
                                                  (48, 24.0, 24.0), (7, 25.0, 0.5)])  # fmt: skip
def test_sample_indices_fps_match_transformers(total, video_fps, fps):
    expected = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps)
    np.testing.assert_array_equal(sample_indices(total, fps=fps, video_fps=video_fps), expected)


def test_sample_indices_all_frames_and_differences():
    metadata = VideoMetadata(total_num_frames=12, fps=24.0)
    np.testing.assert_array_equal(sample_indices(12), default_sample_indices_fn(metadata))
    with pytest.raises(ValueError):  # transformers refuses more frames than there are; we take every frame
        default_sample_indices_fn(metadata, num_frames=20)
    np.testing.assert_array_equal(sample_indices(12, 20), np.arange(12))
    np.testing.assert_array_equal(sample_indices(12, fps=48, video_fps=24.0), np.arange(12))


@pytest.mark.parametrize("kwargs, match", [({"num_frames": 4, "fps": 1.0, "video_fps": 24.0}, "not both"),
                                           ({"num_frames": 0}, "at least 1"), ({"fps": 1.0}, "frame rate"),
                                           ({"fps": 0.0, "video_fps": 24.0}, "positive")])  # fmt: skip
def test_sample_indices_refusals(kwargs, match):
    with pytest.raises(InvalidVideoError, match=match):
        sample_indices(10, **kwargs)


# ----------------------------------------------------------------------------- decoding


CODECS = {  # name: (encoder, container format, suffix, extra encoder options)
    "h264-mp4": ("libx264", "mp4", "mp4", {}),
    "h264-bframes-gop10-mp4": ("libx264", "mp4", "mp4", {"g": "10", "bf": "2"}),
    "h264-bframes-gop10-mkv": ("libx264", "matroska", "mkv", {"g": "10", "bf": "2"}),
    "hevc-mov": ("libx265", "mov", "mov", {"x265-params": "log-level=error:keyint=10"}),
    "vp9-webm": ("libvpx-vp9", "webm", "webm", {"g": "10"}),
    "vp8-webm": ("libvpx", "webm", "webm", {}),
    "av1-mp4": ("libsvtav1", "mp4", "mp4", {}),
    "mpeg4-avi": ("mpeg4", "avi", "avi", {"qscale": "2"}),
    "mjpeg-mov": ("mjpeg", "mov", "mov", {}),
    "gif": ("gif", "gif", "gif", {}),
}


@pytest.mark.parametrize("name", list(CODECS))
def test_frames_are_the_requested_indices(tmp_path, name):
    encoder, fmt, suffix, options = CODECS[name]
    path = videos.write_video(tmp_path / f"v.{suffix}", 60, codec=encoder, fmt=fmt, codec_options=options)
    wanted = [3, 25, 26, 48, 59]
    with open_video(path) as video:
        assert (video.info.frames, video.info.width, video.info.height) == (60, *SIZE)
        frames = list(video.frames([59, 3, 26, 25, 48, 3]))  # any order, repeats: sorted and unique
    assert [videos.read_index(f) for f in frames] == wanted
    assert all(f.mode == "RGB" and f.size == SIZE for f in frames)
    reference = reference_frames(path, wanted)
    for i, frame in zip(wanted, frames, strict=True):
        np.testing.assert_array_equal(np.asarray(frame), reference[i])


SEEKABLE = {  # name: (encoder, suffix, options): keyframes every 10 frames, B-frames where the codec has them
    "h264-mp4": ("libx264", "mp4", {"g": "10", "bf": "3"}),
    "h264-mkv": ("libx264", "mkv", {"g": "10", "bf": "3"}),
    "hevc-open-gop-mov": ("libx265", "mov", {"x265-params": "log-level=error:keyint=10:min-keyint=10:open-gop=1"}),
    "vp9-webm": ("libvpx-vp9", "webm", {"g": "10"}),
    "av1-mkv": ("libsvtav1", "mkv", {"g": "10"}),
    "mpeg4-mp4": ("mpeg4", "mp4", {"g": "10", "bf": "2"}),
}


@pytest.mark.parametrize("name", list(SEEKABLE))
def test_seeking_gives_the_sequential_frames(tmp_path, monkeypatch, name):
    """Every target is reached by seeking (sequential decoding is never needed), pixel-equal to sequential decoding."""
    encoder, suffix, options = SEEKABLE[name]
    path = videos.write_video(tmp_path / f"v.{suffix}", 90, codec=encoder, codec_options=options)
    monkeypatch.setattr(video_module._EncodedVideo, "_sequential", _no_sequential)
    wanted = [int(i) for i in sample_indices(90, 8)] + [89]
    with open_video(path) as video:
        frames = [np.asarray(f) for f in video.frames(wanted)]
    reference = reference_frames(path, wanted)
    assert [videos.read_index(f) for f in frames] == wanted
    assert all(np.array_equal(f, reference[i]) for i, f in zip(wanted, frames, strict=True))


def _no_sequential(self, targets, budget):
    raise AssertionError("decoded sequentially")


def test_variable_frame_rate_decodes_sequentially(tmp_path):
    path = videos.variable_rate(tmp_path / "vfr.mp4", 30)
    with open_video(path) as video:
        assert video._seek_index([2, 20]) is None
        assert [videos.read_index(f) for f in video.frames([2, 20, 29])] == [2, 20, 29]


def test_a_wrong_seek_index_falls_back_to_sequential(tmp_path, monkeypatch):
    """A frame that is not where the index says stops the seeking; the frames left are decoded from the start."""
    path = videos.write_video(tmp_path / "v.mp4", 60, codec_options={"g": "10"})
    real_index, real_sequential, sequential = (
        video_module._EncodedVideo._seek_index,
        video_module._EncodedVideo._sequential,
        [],
    )

    def shifted(self, targets):  # from frame 30 on, one tick late: no decoded frame matches
        index = real_index(self, targets)
        pts = [p + (i >= 30) for i, p in enumerate(index.pts)]
        return video_module._SeekIndex(pts, index.keys, {pts[k]: k for k in index.keys})

    def spy(self, targets, budget):
        sequential.append(list(targets))
        return real_sequential(self, targets, budget)

    monkeypatch.setattr(video_module._EncodedVideo, "_seek_index", shifted)
    monkeypatch.setattr(video_module._EncodedVideo, "_sequential", spy)
    with open_video(path) as video:
        assert [videos.read_index(f) for f in video.frames([5, 33, 57])] == [5, 33, 57]
    assert sequential == [[33, 57]]


def test_audio_tracks_are_ignored(tmp_path):
    path = videos.with_audio(tmp_path / "a.mp4", 24)
    with open_video(path) as video:
        assert video.info.frames == 24 and video.info.fps == 24.0
        assert [videos.read_index(f) for f in video.frames([0, 12, 23])] == [0, 12, 23]


def test_frame_count_of_matroska_is_the_video_tracks(tmp_path):
    """Matroska declares no frame count: it comes from the video track's duration, not the longer audio's."""
    path = videos.with_audio(tmp_path / "a.mkv", 24, seconds=2.0)
    with open_video(path) as video:
        assert (video.info.frames, video.info.duration_s) == (24, 1.0)
        assert [videos.read_index(f) for f in video.frames(sample_indices(24, 8))] == list(sample_indices(24, 8))


def test_no_frame_count_and_no_duration(tmp_path):
    live = videos.write_video(tmp_path / "live.webm", 24, codec="libvpx", container_options={"live": "1"})
    refused(live, "declares neither its frame count nor its duration")


def test_frames_larger_than_declared_are_refused_by_the_decoder(tmp_path):
    """MJPEG frames are independent: frame 3 may be larger than the headers (and frame 0) say."""
    path = videos.size_change(tmp_path / "v.avi", [SIZE] * 3 + [(512, 512)] * 2)
    limits = VideoLimits(max_frame_pixels=64 * 32 * 4)
    with open_video(path, limits) as video:
        assert (video.info.width, video.info.height) == SIZE
        assert [videos.read_index(f) for f in video.frames([0, 2])] == [0, 2]
    refused(path, r"only 3 decodable frames .*Picture size 512x512 exceeds", limits)


def test_bytes_and_path_sources(tmp_path):
    path = videos.write_video(tmp_path / "v.mp4", 24)
    data = path.read_bytes()
    opened = [open_video(path), open_video(str(path)), open_video(data), open_video(bytearray(data)),
              open_video(memoryview(data))]  # fmt: skip
    assert len({v.digest_seed for v in opened}) == 1
    assert {v.info for v in opened} == {opened[0].info}
    for video in opened:
        with video:
            assert [videos.read_index(f) for f in video.frames([1, 22])] == [1, 22]
    other = open_video(videos.video_bytes(24, frame=lambda i, w, h: videos.index_frame(i + 1, w, h)))
    assert other.digest_seed != opened[0].digest_seed


def test_frames_can_be_read_again_and_stopped_early(tmp_path):
    with open_video(videos.write_video(tmp_path / "v.mp4", 24)) as video:
        first = video.frames([0, 10, 20])
        assert videos.read_index(next(first)) == 0
        first.close()
        assert [videos.read_index(f) for f in video.frames([10, 20])] == [10, 20]
        assert list(video.frames([])) == []
        with pytest.raises(ValueError, match="frame indices"):
            next(video.frames([24]))
    with pytest.raises(ValueError, match="closed"):
        next(video.frames([0]))


def test_path_refusals(tmp_path):
    path = videos.write_video(tmp_path / "v.mp4", 24)
    refused(path, r"video is [\d,]+ bytes, over the limit of 1,000 bytes", VideoLimits(max_bytes=1000))
    refused(tmp_path / "missing.mp4", "video file not found")
    refused(tmp_path, "not a video file")
    refused(b"\0" * 2000, "over the limit of 1,000 bytes", VideoLimits(max_bytes=1000))
    refused(12, "unsupported video source of type int")


# ----------------------------------------------------------------------------- lists of frames


def test_list_of_frames(tmp_path):
    arrays = [videos.index_frame(i, *SIZE) for i in range(6)]
    Image.fromarray(arrays[0]).save(tmp_path / "0.png")
    buf = io.BytesIO()
    Image.fromarray(arrays[2]).save(buf, "PNG")
    png = tmp_path / "0.png"
    items = [png, Image.fromarray(arrays[1]), buf.getvalue(), arrays[3], str(png), arrays[5]]
    with open_video(items) as video:
        assert (video.info.frames, video.info.fps, video.info.width, video.info.height) == (6, None, *SIZE)
        frames = list(video.frames(range(6)))
    assert [videos.read_index(f) for f in frames] == [0, 1, 2, 3, 0, 5]
    assert all(f.mode == "RGB" for f in frames)
    stacked = open_video(np.stack(arrays))  # a THWC array
    assert [videos.read_index(f) for f in stacked.frames([1, 4])] == [1, 4]
    assert stacked.digest_seed == open_video(arrays).digest_seed != open_video(arrays[::-1]).digest_seed


def test_list_of_frames_refusals(tmp_path):
    frame = videos.index_frame(0, *SIZE)
    refused([], "at least one frame")
    refused([frame] * 11, "11 frames, over the limit of 10 frames", VideoLimits(max_frames=10))
    refused([frame, {"no": "image"}], "frame 1 of the video is a dict")
    refused([b"not an image"], "frame 0 of the video: image data is not a supported image")
    refused([frame, tmp_path / "missing.png"], "frame 1 of the video: image file not found")


# ----------------------------------------------------------------------------- time limit and cancel


def test_decode_deadline(tmp_path):
    path = videos.write_video(tmp_path / "v.mp4", 48)
    tiny = VideoLimits(max_decode_s=1e-6)
    with (
        open_video(path, tiny) as video,
        pytest.raises(InvalidVideoError, match="took longer than the limit of 1e-06 s"),
    ):
        list(video.frames([0, 47]))


def test_deadline_counts_decoding_only(tmp_path):
    """Time the caller spends between frames (e.g. encoding them) is not decode time."""
    with open_video(videos.write_video(tmp_path / "v.mp4", 24), VideoLimits(max_decode_s=0.25)) as video:
        for _ in video.frames([0, 11, 23]):
            time.sleep(0.1)


@pytest.mark.parametrize("as_frames", [False, True])
def test_cancel_stops_decoding(tmp_path, as_frames):
    source = [videos.index_frame(i, *SIZE) for i in range(300)] if as_frames else videos.video_bytes(300)
    cancelled = threading.Event()
    with open_video(source) as video:
        frames = video.frames(range(300), cancel=cancelled.is_set)
        next(frames)
        cancelled.set()
        started = time.monotonic()
        with pytest.raises(VideoCancelled):
            next(frames)
        assert time.monotonic() - started < 0.5


# ----------------------------------------------------------------------------- hostile inputs


def test_resolution_bomb_gif(tmp_path):
    """A 2-frame GIF of 1x1 images on an 8000x8000 screen (64 bytes; decoding allocates 256 MB per frame)."""
    refused(videos.gif_bomb(tmp_path / "bomb.gif", 8000, 8000), r"8000x8000 = 64,000,000 pixels, over the limit")


def test_resolution_over_the_limit_mp4(tmp_path):
    path = videos.repeated(tmp_path / "big.mp4", 2, size=(4608, 2592))
    refused(path, r"4608x2592 = 11,943,936 pixels, over the limit of 9,437,184")


@pytest.mark.parametrize("fmt", ["avi", "mp4"])
def test_resolution_bomb_in_the_bitstream(fmt):
    """The container says 64x32; the MPEG-4 headers say 8000x8000: refused on open or on decode."""
    data = videos.patch_mpeg4_size(videos.video_bytes(5, codec="mpeg4", fmt=fmt), 8000, 8000)
    refused(data, "corrupt|no frame size|decodable")


def test_many_large_frames_in_a_small_file(tmp_path):
    """3,000 4096x2304 frames (a static picture) in ~130 KB: 28 G pixels to decode."""
    path = videos.repeated(tmp_path / "bomb.mp4", 3000, size=(4096, 2304))
    assert path.stat().st_size < 500_000
    refused(path, r"3,000 frames x 9,437,184 pixels = 28,311,552,000 pixels to decode, over the limit")


def test_ten_thousand_frames(tmp_path):
    path = videos.repeated(tmp_path / "long.mp4", 10_000, size=(16, 16))
    refused(path, "10,000 frames, over the limit of 9,000 frames")


def test_two_hours_declared_in_two_frames(tmp_path):
    path = videos.two_frames_apart(tmp_path / "gap.mp4", 7200)
    assert path.stat().st_size < 5_000
    refused(path, r"7,20\d\.\d s long, over the limit of 600 s")


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_files(tmp_path, fraction):
    plain = videos.write_video(tmp_path / "plain.mp4", 96).read_bytes()  # moov atom last: gone when cut
    refused(plain[: int(len(plain) * fraction)], "not a supported video .*, or it is corrupt")
    faststart = videos.write_video(tmp_path / "fast.mp4", 96, container_options={"movflags": "faststart"})
    cut = faststart.read_bytes()[: int(faststart.stat().st_size * fraction)]
    error = refused(cut, r"only [\d,]+ decodable frames of the 96 it declares")
    decodable = int(str(error).split("only ")[1].split(" ")[0])
    with open_video(cut) as video:  # the frames before the cut are there
        assert [videos.read_index(f) for f in video.frames([0, decodable - 1])] == [0, decodable - 1]


def test_not_videos(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    refused(png.getvalue(), "container 'png_pipe' is not supported")
    refused(np.random.default_rng(0).integers(0, 256, 10_000, np.uint8).tobytes(), "not a supported video")
    refused(b"just some text, not a video\n" * 100, "not a supported video")
    (tmp_path / "empty.mp4").write_bytes(b"")
    refused(tmp_path / "empty.mp4", r"empty \(0 bytes\)")


def test_containers_and_codecs_off_the_allow_list(tmp_path):
    ts = videos.write_video(tmp_path / "v.ts", 12, codec="mpeg2video", fmt="mpegts")
    refused(ts, "container 'mpegts' is not supported")
    ffv1 = videos.write_video(tmp_path / "v.mkv", 12, codec="ffv1", fmt="matroska")
    refused(ffv1, "video codec 'ffv1' is not supported")


def test_import_is_lazy_and_ffmpeg_quiet(tmp_path):
    """Importing the module does not import PyAV; refusing broken files prints nothing (FFmpeg's logs are off)."""
    faststart = videos.write_video(tmp_path / "v.mp4", 96, container_options={"movflags": "faststart"})
    (tmp_path / "cut.mp4").write_bytes(faststart.read_bytes()[:2500])
    code = f"""
import sys
from llava_ov.runtime.video import open_video
from llava_ov.errors import InvalidVideoError
assert 'av' not in sys.modules, 'av imported'
for source in (b"junk" * 1000, {str(tmp_path / "cut.mp4")!r}):
    try:
        list(open_video(source).frames(range(96)))
    except InvalidVideoError:
        pass
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""


def _cut_by_stream_copy(n: int = 60, cut: int = 20) -> bytes:
    """An mp4 whose first `cut` frames are before 0 (what `ffmpeg -ss ... -c copy` writes): its edit list
    marks their packets discarded, but mp4's frame count still includes them."""
    raw = io.BytesIO()
    with av.open(raw, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=24, options={"preset": "ultrafast", "g": str(n), "bf": "0"})
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(videos.index_frame(i), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    raw.seek(0)
    out = io.BytesIO()
    with av.open(raw) as src, av.open(out, "w", format="mp4") as dst:
        ist = src.streams.video[0]
        ost = dst.add_stream_from_template(ist)
        shift = int(cut / 24 / ist.time_base)
        for p in src.demux(ist):
            if p.dts is None:
                continue
            p.pts, p.dts, p.stream = p.pts - shift, p.dts - shift, ost
            dst.mux(p)
    return out.getvalue()


def test_frames_a_file_shows_not_what_it_declares(tmp_path):
    """A stream-copied cut (discarded packets in mp4's count) and a variable-rate mkv (duration x nominal rate)
    declare more frames than they show: sampling uses the frames shown, so every sampled frame comes."""
    cut = _cut_by_stream_copy()
    with open_video(cut) as video:
        assert video.info.frames == 40
        frames = list(video.frames(sample_indices(video.info.frames, 8)))
        assert len(frames) == 8
    vfr = videos.variable_rate(tmp_path / "vfr.mkv")
    with open_video(vfr) as video:
        assert video.info.frames == 30
        assert [videos.read_index(f) for f in video.frames(sample_indices(30, 8))] == list(sample_indices(30, 8))
