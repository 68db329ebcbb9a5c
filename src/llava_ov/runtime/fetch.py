"""Fetching image URLs safely: the one implementation the server and batch jobs share.

An http(s) URL is downloaded under a `FetchPolicy`: bounded in bytes and total
time, and never reaching loopback/private/link-local/reserved addresses unless
allowed (also in IPv4-mapped, NAT64, 6to4 and Teredo IPv6 forms).  Every
address the host name resolves to is checked, the connection is pinned to a
checked address (Host header and TLS SNI keep the name, so DNS cannot change in
between), redirects are followed by hand and checked again, and proxies from
the environment are ignored.  `ImageFetcher.fetch` is the async form (the
server); `fetch_url` the synchronous one (batch rows, worker processes and
threads).  Also here: `decode_data_url` and `local_path`.  Every refusal is an
`InvalidImageError` with a one-line message.  httpx is imported on first use.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from llava_ov.errors import InvalidImageError, LlavaOvError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
NAT64 = ipaddress.ip_network("64:ff9b::/96")
REDIRECTS = {301, 302, 303, 307, 308}


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and permissions for downloading image URLs."""

    max_bytes: int = 20 * 1024 * 1024
    allow_private_urls: bool = False
    fetch_timeout_s: float = 10.0  # the whole download: resolving, redirects and body
    max_redirects: int = 3
    what: str = "image"  # what is fetched, as refusals name it ("video" for video URLs)
    accept: str = "image/*"

    def ip_allowed(self, ip: IPAddress) -> bool:
        return self.allow_private_urls or is_public_ip(ip)


def is_public_ip(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses (also unwrapping IPv4-mapped/NAT64/6to4/Teredo forms)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_ip(embedded)
    return ip.is_global and not (ip.is_multicast or ip.is_unspecified or ip.is_reserved)


def decode_data_url(
    url: str, max_bytes: int, mime_types: frozenset[str] | None = None, what: str = "image", example: str = "image/png"
) -> bytes:
    """The bytes of a `data:[mediatype];base64,...` URL whose media type is one of `mime_types` (images by default)."""
    from llava_ov.runtime.image import IMAGE_MIME_TYPES

    allowed = IMAGE_MIME_TYPES if mime_types is None else mime_types
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise InvalidImageError(f"a data URL {what} must be base64: data:{example};base64,...")
    mime = header[5:-7].split(";")[0].strip().lower()  # data:<mime>[;params];base64
    if mime not in allowed:
        listed = "image/png, jpeg, webp, gif, bmp or tiff" if mime_types is None else ", ".join(sorted(allowed))
        raise InvalidImageError(f"a data URL {what} must be {listed}, not {mime or 'none'!r}")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise InvalidImageError(f"{what} is over the limit of {max_bytes:,} bytes")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError("the data URL's base64 payload is invalid") from None


def local_path(url: str) -> str | None:
    """The filesystem path a `file://` URL or a plain path names; None for other URLs."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return unquote(parts.path)
    if parts.scheme == "" or (len(parts.scheme) == 1 and url[1:3] in (":\\", ":/")):  # Windows drive letter
        return url
    return None


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
        raise InvalidImageError(f"cannot resolve the URL's host {host!r}") from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


class ImageFetcher:
    """Downloads http(s) images under a `FetchPolicy`."""

    def __init__(self, policy: FetchPolicy, resolver: Resolver = resolve):
        self.policy = policy
        self.resolver = resolver  # injectable for tests

    async def fetch(self, url: str) -> bytes:
        """The body at `url` (redirects followed), or InvalidImageError."""
        try:
            return await asyncio.wait_for(self._follow(url), self.policy.fetch_timeout_s)
        except asyncio.TimeoutError:
            limit = self.policy.fetch_timeout_s
            raise InvalidImageError(f"downloading the {self.policy.what} took longer than {limit:g} s") from None

    async def _follow(self, url: str) -> bytes:
        httpx = _httpx()
        # trust_env=False: a proxy from the environment would bypass the address checks
        options = {"trust_env": False, "follow_redirects": False, "timeout": self.policy.fetch_timeout_s}
        async with httpx.AsyncClient(**options) as client:
            for _ in range(self.policy.max_redirects + 1):
                try:
                    location, data = await self._get_once(client, url)
                except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:  # ValueError: e.g. a bad port
                    raise InvalidImageError(f"cannot download the {self.policy.what}: {type(exc).__name__}") from None
                if location is None:
                    return data
                url = urljoin(url, location)
        raise InvalidImageError(f"the {self.policy.what} URL redirected more than {self.policy.max_redirects} times")

    async def _get_once(self, client: Any, url: str) -> tuple[str | None, bytes]:
        """One GET pinned to a checked address: (redirect location or None, body)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidImageError(f"only http:// and https:// {self.policy.what} URLs are downloaded")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = await self.resolver(parts.hostname, port)
        if not addresses or not all(self.policy.ip_allowed(ip) for ip in addresses):
            raise InvalidImageError(
                f"the {self.policy.what} URL points to a loopback, private or link-local address, which is not fetched "
                "unless private URLs are allowed (--allow-private-urls)"
            )
        pinned = _pinned_url(url, addresses[0])
        headers = {"Host": parts.netloc.rpartition("@")[2], "Accept": self.policy.accept, "User-Agent": "llava-ov",
                   "Accept-Encoding": "identity"}  # images are compressed already; see _read_bounded  # fmt: skip
        request = client.build_request("GET", pinned, headers=headers, extensions={"sni_hostname": parts.hostname})
        response = await client.send(request, stream=True)
        try:
            if response.status_code in REDIRECTS and "location" in response.headers:
                return response.headers["location"], b""
            if response.status_code != 200:
                raise InvalidImageError(f"downloading the {self.policy.what} failed with HTTP status {response.status_code}")
            return None, await self._read_bounded(response)
        finally:
            await response.aclose()

    async def _read_bounded(self, response: Any) -> bytes:
        limit = self.policy.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise InvalidImageError(f"{self.policy.what} is over the limit of {limit:,} bytes")
        decoded = BoundedDecoder(response.headers.get("content-encoding", ""), limit, self.policy.what)
        async for piece in response.aiter_raw():  # raw: httpx would inflate each chunk without a bound
            decoded.feed(piece)
        return decoded.finish()


class BoundedDecoder:
    """The body as sent, or gzip/deflate inflated, never holding more than `limit` decoded bytes.

    A few hundred bytes of brotli or gzip can stand for gigabytes; httpx decodes every chunk
    whole, so the fetcher asks for identity and decodes what a server compresses anyway here,
    bounded. Encodings it cannot bound (br, zstd, ...) are refused."""

    def __init__(self, encoding: str, limit: int, what: str = "image"):
        import zlib

        self.limit, self.what = limit, what
        self.data = bytearray()
        codings = [c.strip().lower() for c in encoding.split(",") if c.strip() and c.strip().lower() != "identity"]
        if len(codings) > 1 or (codings and codings[0] not in ("gzip", "x-gzip", "deflate")):
            raise InvalidImageError(f"the {what} was sent with Content-Encoding {encoding!r}, which is not accepted")
        self.inflate = zlib.decompressobj(32 + zlib.MAX_WBITS) if codings else None  # gzip or zlib header

    def _add(self, piece: bytes) -> None:
        self.data += piece
        if len(self.data) > self.limit:
            raise InvalidImageError(f"{self.what} is over the limit of {self.limit:,} bytes")

    def feed(self, raw: bytes) -> None:
        if self.inflate is None:
            self._add(raw)
            return
        import zlib

        try:
            while raw:
                self._add(self.inflate.decompress(raw, self.limit - len(self.data) + 1))
                raw = self.inflate.unconsumed_tail
        except zlib.error:
            raise InvalidImageError(f"the {self.what}'s compressed transfer encoding is corrupt") from None

    def finish(self) -> bytes:
        if self.inflate is not None:
            self._add(self.inflate.flush(self.limit - len(self.data) + 1))
        return bytes(self.data)


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise LlavaOvError("downloading image URLs needs httpx: pip install 'httpx>=0.27'") from None
    return httpx


def _pinned_url(url: str, ip: IPAddress) -> str:
    """`url` with its host replaced by the checked IP (Host header and SNI keep the name)."""
    parts = urlsplit(url)
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


def fetch_url(url: str, policy: FetchPolicy = FetchPolicy()) -> bytes:
    """`ImageFetcher(policy).fetch(url)` for synchronous code: call it where no event loop runs in this thread."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(ImageFetcher(policy).fetch(url))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()  # unlike asyncio.run, does not wait for a resolver thread stuck past the time limit
