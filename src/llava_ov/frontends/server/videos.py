"""Video URLs of chat requests -> checked encoded videos (or checked frame lists), refusing what was not allowed.

A `video_url` part (vLLM's form) is a `data:video/...;base64,` URL, an http(s) URL (downloaded by
`llava_ov.runtime.fetch` with the image path's guards: size and time limits, public addresses only
unless allowed, pinned connection, redirects checked again) or, when local files are allowed, a path.
The video is then opened and checked (container, codec, declared size, frame count, duration) off the
event loop, without decoding frames: a hostile file is a 400 before the request waits for the engine.
A `video` part with a list of image URLs is a video given as its frames ("frames as images").
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from llava_ov.errors import InvalidImageError
from llava_ov.frontends.server.images import ImageLoader, UrlLoader
from llava_ov.runtime.fetch import FetchPolicy, ImageFetcher
from llava_ov.runtime.video import VIDEO_MIME_TYPES, InvalidVideoError, VideoLimits, open_video


@dataclass(frozen=True)
class VideoPolicy(FetchPolicy):
    """Download limits for video URLs, the decode limits of `runtime.video`, and the local-file permission."""

    max_bytes: int = 64 * 1024 * 1024
    what: str = "video"
    accept: str = "video/*"
    limits: VideoLimits = field(default_factory=VideoLimits)
    allow_local_files: bool = False


class VideoLoader(UrlLoader):
    """Turns a `video_url.url` into checked encoded bytes (or a path), a few checks at a time."""

    mime_types = VIDEO_MIME_TYPES
    example_mime = "video/mp4"
    error = InvalidVideoError

    def __init__(self, policy: VideoPolicy, fetcher: ImageFetcher | None = None, concurrency: int = 2, downloads: int = 4):
        super().__init__(policy, fetcher, concurrency, downloads)

    async def load(self, url: str) -> Any:
        """InvalidVideoError with a client-safe message for anything refused."""
        try:
            source = await self._source(url)
        except InvalidImageError as exc:  # the shared fetcher's refusals
            raise InvalidVideoError(str(exc)) from None
        async with self._checks:
            await asyncio.to_thread(self._check, source)
        return source

    async def frames(self, urls: list[str], images: ImageLoader) -> list[Any]:
        """A video given as its frames: each an image URL, checked as images are; all of them within the
        video's byte limit and one download time limit."""
        if len(urls) > self.policy.limits.max_frames:
            raise InvalidVideoError(f"{len(urls)} frames; the limit is {self.policy.limits.max_frames}")
        try:
            return await asyncio.wait_for(self._frames(urls, images), self.policy.fetch_timeout_s)
        except asyncio.TimeoutError:
            raise InvalidVideoError(f"loading the video's frames took longer than {self.policy.fetch_timeout_s:g} s") from None
        except InvalidImageError as exc:
            raise InvalidVideoError(f"a frame of the video: {exc}") from None

    async def _frames(self, urls: list[str], images: ImageLoader) -> list[Any]:
        frames, total = [], 0
        for url in urls:
            frames.append(await images.load(url))
            total += len(frames[-1]) if isinstance(frames[-1], (bytes, bytearray)) else 0
            if total > self.policy.max_bytes:
                raise InvalidVideoError(f"the video's frames are over the limit of {self.policy.max_bytes:,} bytes")
        return frames

    def _check(self, source: Any) -> None:
        open_video(source, self.policy.limits).close()
