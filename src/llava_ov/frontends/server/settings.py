"""Server options and limits: what `llava-ov serve` flags set, with safe defaults.

How the model loads and runs (device, KV cache, engine limits, ...) is `load`, a `LoadSettings`:
the same settings, flags and checks as every other front end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llava_ov.runtime.settings import LoadSettings
from llava_ov.runtime.video import VideoLimits

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Everything the app needs: the model, how it loads (`load`), and the server's own limits."""

    model: str = ""  # export directory or hub id to load
    model_id: str = ""  # the name /v1/models reports (default: derived from `model`)
    weight_format: str = "int4"  # for a hub id converted on first use
    load: LoadSettings = field(default_factory=LoadSettings)  # how the default loader loads `model`
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer KEY`
    max_queue: int = 16  # requests accepted beyond what the engine runs at once; more get 429
    max_body_bytes: int = 32 * MiB
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 40_000_000
    max_request_pixels: int = 100_000_000  # all images of a request, declared (decoded RGB: 3 bytes each)
    max_images: int = 8  # per request
    max_videos: int = 2  # per request
    max_video_bytes: int = 64 * MiB
    max_video_seconds: float = 600.0  # declared duration
    max_video_frames: int = 9_000  # declared frame count
    num_frames: int | None = None  # default frames sampled per video (None: the model's own)
    allow_local_files: bool = False  # file:// URLs and plain paths in image_url
    allow_private_urls: bool = False  # http(s) image URLs reaching loopback/private/link-local addresses
    max_tokens: int = 1024  # cap on max_tokens, and the default when a request gives none
    max_prompt_tokens: int | None = None  # longest prompt accepted, images included (None: the context)
    max_image_tokens: int | None = None  # default image-token budget of a request (None: none)
    visual_token_pruning: float = 0.0  # default CDPruner ratio of a request (0: off)
    prompt_lookup: int = 0  # default tokens proposed per step by prompt lookup (0: off)
    request_timeout_s: float = 600.0  # queue wait + generation; the answer is cut when it runs out
    fetch_timeout_s: float = 10.0  # total time to download one image URL
    max_redirects: int = 3
    max_connections: int = 10_000  # open sockets (~4.4 KB of RSS each when idle); past it the longest-idle one is closed for a new one
    max_requests: int = 64  # requests in progress (bodies being read, queued, generating); more get 503 at once
    header_timeout_s: float = 10.0  # a request's headers must arrive within this
    body_timeout_s: float = 30.0  # and its body within this after them (408 beyond)
    max_header_bytes: int = 64 * 1024  # request line + headers
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this

    def video_limits(self) -> VideoLimits:
        """What a request's videos may be, checked before any frame is decoded."""
        return VideoLimits(max_bytes=self.max_video_bytes, max_duration_s=self.max_video_seconds,
                           max_frames=self.max_video_frames)  # fmt: skip

    @property
    def served_name(self) -> str:
        """Model id shown to clients: explicit name, else the folder name or hub id."""
        if self.model_id:
            return self.model_id
        path = Path(self.model)
        return path.name if path.is_dir() else (self.model or "llava-ov")
