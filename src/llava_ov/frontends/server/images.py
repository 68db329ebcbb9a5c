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

from llava_ov.errors import InvalidImageError, LlavaOvError
from llava_ov.runtime.fetch import FetchPolicy, ImageFetcher, decode_data_url, local_path
from llava_ov.runtime.image import check_encoded


@dataclass(frozen=True)
class ImagePolicy(FetchPolicy):
    """The shared `FetchPolicy` plus the server's decode and local-file limits."""

    max_pixels: int = 40_000_000
    allow_local_files: bool = False


class UrlLoader:
    """A content part's URL -> its bytes (a `data:` URL or an http(s) download, a few at a time) or, when local
    files are allowed, its path. What is loaded (`policy.what`) names it in refusals."""

    mime_types: frozenset[str] | None = None  # of data: URLs (None: images)
    example_mime = "image/png"
    error: type[LlavaOvError] = InvalidImageError

    def __init__(self, policy: Any, fetcher: ImageFetcher | None, concurrency: int, downloads: int):
        self.policy = policy
        self.fetcher = fetcher or ImageFetcher(policy)
        self._checks = asyncio.Semaphore(concurrency)  # CPU and memory: a few at a time
        self._downloads = asyncio.Semaphore(downloads)  # waiting on the network: separate, so slow hosts never
        # hold the check slots of other requests

    async def _source(self, url: str) -> Any:
        what = self.policy.what
        if url[:5].lower() == "data:":
            return decode_data_url(url, self.policy.max_bytes, self.mime_types, what, self.example_mime)
        if urlsplit(url).scheme.lower() in ("http", "https"):
            async with self._downloads:
                return await self.fetcher.fetch(url)
        if (path := local_path(url)) is not None:
            if not self.policy.allow_local_files:
                raise self.error(f"local files are not allowed as {what}s here; send a data: or http(s) URL")
            return path
        raise self.error(f"unsupported {what} URL scheme; use data:{what}/...;base64, or http(s)")


class ImageLoader(UrlLoader):
    """Turns an `image_url.url` into checked encoded image bytes, a few checks at a time."""

    def __init__(
        self, policy: ImagePolicy, fetcher: ImageFetcher | None = None, concurrency: int = 2, downloads: int = 16
    ):
        super().__init__(policy, fetcher, concurrency, downloads)

    async def load(self, url: str) -> Any:
        """The image's checked encoded bytes; InvalidImageError with a client-safe message for anything refused
        or undecodable."""
        data, _ = await self.load_counted(url)
        return data

    async def load_counted(self, url: str) -> tuple[bytes, int]:
        """(checked encoded bytes, the pixels its header declares): nothing is decoded."""
        from starlette.concurrency import run_in_threadpool

        source = await self._source(url)
        async with self._checks:
            return await run_in_threadpool(check_encoded, source, max_bytes=self.policy.max_bytes,
                                           max_pixels=self.policy.max_pixels)  # fmt: skip
