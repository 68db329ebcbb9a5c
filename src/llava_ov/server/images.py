"""Image URLs of chat requests -> decoded PIL images, refusing what was not allowed.

Sources: `data:image/...;base64,` URLs; http(s) URLs, downloaded with a size and
time limit, never reaching loopback/private/link-local addresses unless allowed
(every resolved IP is checked, the connection is pinned to a checked IP so DNS
cannot change in between, redirects are followed by hand and re-checked);
`file://` URLs and plain paths only when local files are allowed.  Decoding is
bounded in bytes and pixels by `llava_ov.image.load_image`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from ..errors import InvalidImageError
from ..image import load_image

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")
REDIRECTS = {301, 302, 303, 307, 308}


@dataclass(frozen=True)
class ImagePolicy:
    """Limits and permissions for images in requests."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    allow_local_files: bool = False
    allow_private_urls: bool = False
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3

    def ip_allowed(self, ip: IPAddress) -> bool:
        return self.allow_private_urls or is_public_ip(ip)


def is_public_ip(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses (also unwrapping IPv4-mapped/NAT64/6to4 forms)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_ip(embedded)
    return ip.is_global and not (ip.is_multicast or ip.is_unspecified or ip.is_reserved)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:[mediatype];base64,...` URL."""
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise InvalidImageError("a data URL image must be base64: data:image/png;base64,...")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise InvalidImageError(f"image is over the limit of {max_bytes:,} bytes")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError("the data URL's base64 payload is invalid") from None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (a literal IP resolves to itself)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidImageError(f"cannot resolve the image URL's host {host!r}") from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


class ImageFetcher:
    """Downloads http(s) images under an `ImagePolicy`."""

    def __init__(self, policy: ImagePolicy, resolver: Callable[[str, int], Any] = resolve):
        self.policy = policy
        self.resolver = resolver  # injectable for tests

    async def fetch(self, url: str) -> bytes:
        try:
            return await asyncio.wait_for(self._follow(url), self.policy.fetch_timeout_s)
        except asyncio.TimeoutError:
            limit = self.policy.fetch_timeout_s
            raise InvalidImageError(f"downloading the image took longer than {limit:g} s") from None

    async def _follow(self, url: str) -> bytes:
        import httpx

        # trust_env=False: a proxy from the environment would bypass the address checks
        options = {"trust_env": False, "follow_redirects": False, "timeout": self.policy.fetch_timeout_s}
        async with httpx.AsyncClient(**options) as client:
            for _ in range(self.policy.max_redirects + 1):
                try:
                    location, data = await self._get_once(client, url)
                except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # ValueError: e.g. a bad port
                    raise InvalidImageError(f"cannot download the image: {type(exc).__name__}") from None
                if location is None:
                    return data
                url = urljoin(url, location)
        raise InvalidImageError(f"the image URL redirected more than {self.policy.max_redirects} times")

    async def _get_once(self, client: Any, url: str) -> tuple[str | None, bytes]:
        """One GET pinned to a checked address: (redirect location or None, body)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidImageError("image URLs must be http(s) or data: URLs")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = await self.resolver(parts.hostname, port)
        if not addresses or not all(self.policy.ip_allowed(ip) for ip in addresses):
            raise InvalidImageError(
                "the image URL points to a loopback, private or link-local address, which this server does not "
                "fetch (see --allow-private-urls)"
            )
        pinned = _pinned_url(url, addresses[0])
        headers = {"Host": parts.netloc.rpartition("@")[2], "Accept": "image/*"}
        request = client.build_request("GET", pinned, headers=headers, extensions={"sni_hostname": parts.hostname})
        response = await client.send(request, stream=True)
        try:
            if response.status_code in REDIRECTS and "location" in response.headers:
                return response.headers["location"], b""
            if response.status_code != 200:
                raise InvalidImageError(f"downloading the image failed with HTTP status {response.status_code}")
            return None, await self._read_bounded(response)
        finally:
            await response.aclose()

    async def _read_bounded(self, response: Any) -> bytes:
        limit = self.policy.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise InvalidImageError(f"image is over the limit of {limit:,} bytes")
        data = bytearray()
        async for piece in response.aiter_bytes():
            data += piece
            if len(data) > limit:
                raise InvalidImageError(f"image is over the limit of {limit:,} bytes")
        return bytes(data)


def _pinned_url(url: str, ip: IPAddress) -> str:
    """`url` with its host replaced by the checked IP (Host header and SNI keep the name)."""
    parts = urlsplit(url)
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


def local_path(url: str) -> str | None:
    """The filesystem path a `file://` URL or a plain path names; None for other URLs."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return unquote(parts.path)
    if parts.scheme == "" or (len(parts.scheme) == 1 and url[1:3] in (":\\", ":/")):  # Windows drive letter
        return url
    return None


class ImageLoader:
    """Turns an `image_url.url` into an RGB PIL image, a few decodes at a time (bounding memory under load)."""

    def __init__(self, policy: ImagePolicy, fetcher: ImageFetcher | None = None, concurrency: int = 2):
        self.policy = policy
        self.fetcher = fetcher or ImageFetcher(policy)
        self._slots = asyncio.Semaphore(concurrency)

    async def load(self, url: str) -> Any:
        """InvalidImageError with a client-safe message for anything refused or undecodable."""
        from starlette.concurrency import run_in_threadpool

        limits = {"max_bytes": self.policy.max_bytes, "max_pixels": self.policy.max_pixels}
        async with self._slots:
            if url[:5].lower() == "data:":
                source: Any = decode_data_url(url, self.policy.max_bytes)
            elif urlsplit(url).scheme.lower() in ("http", "https"):
                source = await self.fetcher.fetch(url)
            elif (path := local_path(url)) is not None:
                if not self.policy.allow_local_files:
                    raise InvalidImageError("local files are not allowed as images here; send a data: or http(s) URL")
                source = path
            else:
                raise InvalidImageError("unsupported image URL scheme; use data:image/...;base64, or http(s)")
            return await run_in_threadpool(load_image, source, **limits)
