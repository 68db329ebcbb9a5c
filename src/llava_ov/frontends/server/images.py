"""Image URLs of chat requests -> checked encoded images, refusing what was not allowed.

Sources: `data:image/...;base64,` URLs; http(s) URLs, downloaded by
`llava_ov.runtime.fetch` (size and time limits, public addresses only unless allowed,
connection pinned to a checked address, redirects checked again); `file://`
URLs and plain paths only when local files are allowed.  This module adds what
is per request: the policy's pixel limit and local-file permission, and a few
checks at a time off the event loop (downloads have slots of their own).  An image is checked
(allowed format, size, declared pixels) but not decoded here: the request keeps its encoded bytes
while it waits for the engine, and the pipeline decodes them when it runs (a corrupt image whose
header passed is then a 400 from the run).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from llava_ov.errors import InvalidImageError
from llava_ov.runtime.fetch import FetchPolicy, ImageFetcher, decode_data_url, local_path
from llava_ov.runtime.image import check_encoded


@dataclass(frozen=True)
class ImagePolicy(FetchPolicy):
    """The shared `FetchPolicy` plus the server's decode and local-file limits."""

    max_pixels: int = 40_000_000
    allow_local_files: bool = False


class ImageLoader:
    """Turns an `image_url.url` into checked encoded image bytes, a few checks at a time."""

    def __init__(
        self, policy: ImagePolicy, fetcher: ImageFetcher | None = None, concurrency: int = 2, downloads: int = 16
    ):
        self.policy = policy
        self.fetcher = fetcher or ImageFetcher(policy)
        self._decodes = asyncio.Semaphore(concurrency)  # CPU and memory: a few at a time
        self._downloads = asyncio.Semaphore(downloads)  # waiting on the network: separate, so slow hosts never
        # hold the decode slots of other requests

    async def load(self, url: str) -> Any:
        """InvalidImageError with a client-safe message for anything refused or undecodable."""
        from starlette.concurrency import run_in_threadpool

        limits = {"max_bytes": self.policy.max_bytes, "max_pixels": self.policy.max_pixels}
        if url[:5].lower() == "data:":
            source: Any = decode_data_url(url, self.policy.max_bytes)
        elif urlsplit(url).scheme.lower() in ("http", "https"):
            async with self._downloads:
                source = await self.fetcher.fetch(url)
        elif (path := local_path(url)) is not None:
            if not self.policy.allow_local_files:
                raise InvalidImageError("local files are not allowed as images here; send a data: or http(s) URL")
            source = path
        else:
            raise InvalidImageError("unsupported image URL scheme; use data:image/...;base64, or http(s)")
        async with self._decodes:
            return await run_in_threadpool(check_encoded, source, **limits)
