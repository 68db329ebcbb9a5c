"""Image URLs (llava_ov.runtime.fetch, used by the server and batch): address checks (SSRF), pinning, redirects,
size limits, data URLs, local paths (no model needed)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import ipaddress
import time
from contextlib import contextmanager

import pytest
from PIL import Image

from conftest import reply, serve_http
from llava_ov.errors import InvalidImageError
from llava_ov.runtime.fetch import FetchPolicy, ImageFetcher, decode_data_url, fetch_url, is_public_ip, local_path
from llava_ov.frontends.server.images import ImageLoader, ImagePolicy

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True),
        ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
        ("::1", False), ("fe80::1", False), ("fc00::1", False), ("::", False),
        ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True), ("64:ff9b::a00:1", False), ("2002:7f00:1::", False),
    ],
)  # fmt: skip
def test_public_addresses(address, public):
    assert is_public_ip(ipaddress.ip_address(address)) is public


class LoopbackOnly(FetchPolicy):
    """Lets the test server on 127.0.0.1 stand in for a public host; everything else private stays refused."""

    def ip_allowed(self, ip) -> bool:
        return ip == ipaddress.ip_address("127.0.0.1") or is_public_ip(ip)


@contextmanager
def image_host():
    """/img: a PNG; /big: 1 MB; /host: the Host header; /to-metadata: redirect to a link-local address;
    /to-img: redirect to /img."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/host":
                reply(self, 200, self.headers["Host"].encode())
                return
            if self.path.startswith("/to-"):
                target = "http://169.254.169.254/latest" if self.path == "/to-metadata" else "/img"
                reply(self, 302, Location=target)
                return
            body = PNG if self.path == "/img" else b"\0" * 1_000_000
            reply(self, 200 if self.path in ("/img", "/big") else 404, body)

        def log_message(self, *args):
            pass

    with serve_http(Handler) as base:
        yield base


def fetch(url: str, policy: FetchPolicy) -> bytes:
    return asyncio.run(ImageFetcher(policy).fetch(url))


def test_server_policy_extends_the_shared_one():
    policy = ImagePolicy(max_bytes=5, allow_private_urls=True, fetch_timeout_s=1.5, max_pixels=7)
    assert isinstance(policy, FetchPolicy) and policy.ip_allowed(ipaddress.ip_address("10.0.0.1"))
    assert (policy.max_bytes, policy.fetch_timeout_s, policy.max_pixels, policy.allow_local_files) == (5, 1.5, 7, False)


def test_fetch_and_redirect_within_allowed_addresses():
    with image_host() as host:
        assert fetch(f"{host}/img", LoopbackOnly()) == PNG
        assert fetch(f"{host}/to-img", LoopbackOnly()) == PNG


def test_redirect_to_link_local_address_is_refused():
    with image_host() as host, pytest.raises(InvalidImageError, match="private"):
        fetch(f"{host}/to-metadata", LoopbackOnly())


def test_loopback_is_refused_by_default_and_allowed_when_enabled():
    with image_host() as host:
        with pytest.raises(InvalidImageError, match="private"):
            fetch(f"{host}/img", FetchPolicy())
        assert fetch(f"{host}/img", FetchPolicy(allow_private_urls=True)) == PNG


def test_connection_goes_to_the_checked_address_with_the_name_in_host():
    """A name no DNS knows: the download works only because it is pinned to the address the resolver checked."""
    seen = []

    async def resolver(host, port):
        seen.append((host, port))
        return [ipaddress.ip_address("127.0.0.1")]

    with image_host() as host:
        port = int(host.rsplit(":", 1)[1])
        body = asyncio.run(ImageFetcher(LoopbackOnly(), resolver).fetch(f"http://images.invalid:{port}/host"))
    assert body == f"images.invalid:{port}".encode() and seen == [("images.invalid", port)]


def test_sync_fetch_url_works_in_threads_without_a_loop():
    from concurrent.futures import ThreadPoolExecutor

    with image_host() as host, ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda p: fetch_url(f"{host}/{p}", LoopbackOnly()), ["img", "to-img"])) == [PNG, PNG]
        with pytest.raises(InvalidImageError, match="private"):
            pool.submit(fetch_url, f"{host}/img").result()  # default policy: loopback refused


def test_too_many_redirects_are_refused():
    with image_host() as host, pytest.raises(InvalidImageError, match="redirected more than 0 times"):
        fetch(f"{host}/to-img", LoopbackOnly(max_redirects=0))


def test_names_resolving_to_private_addresses_are_refused():
    async def resolver(host, port):  # a public-looking name whose DNS answer includes a private address
        return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.5")]

    with pytest.raises(InvalidImageError, match="private"):
        asyncio.run(ImageFetcher(FetchPolicy(), resolver).fetch("http://images.example/cat.png"))


def test_download_size_limit_and_http_errors():
    with image_host() as host:
        with pytest.raises(InvalidImageError, match="over the limit"):
            fetch(f"{host}/big", LoopbackOnly(max_bytes=100_000))
        with pytest.raises(InvalidImageError, match="404"):
            fetch(f"{host}/missing", LoopbackOnly())


@pytest.mark.parametrize("url", ["ftp://example.com/x.png", "http:///nohost", "http://[::1"])
def test_malformed_or_unsupported_urls(url):
    with pytest.raises(InvalidImageError):
        fetch(url, FetchPolicy())


def test_data_urls():
    assert decode_data_url("data:image/png;base64," + base64.b64encode(PNG).decode(), 10_000) == PNG
    for mime in ("application/postscript", "text/html", ""):
        with pytest.raises(InvalidImageError, match="must be image/png"):
            decode_data_url(f"data:{mime};base64," + base64.b64encode(PNG).decode(), 10_000)
    assert decode_data_url("data:image/JPEG;charset=x;base64," + base64.b64encode(PNG).decode(), 10_000) == PNG
    for bad in ("data:image/png,abc", "data:image/png;base64,%%%", "data:image/png;base64"):
        with pytest.raises(InvalidImageError):
            decode_data_url(bad, 10_000)
    with pytest.raises(InvalidImageError, match="over the limit"):
        decode_data_url("data:image/png;base64," + "A" * 4000, 1000)


def test_local_path_detection():
    assert local_path("file:///tmp/a%20b.png") == "/tmp/a b.png"
    assert local_path("/etc/passwd") == "/etc/passwd" and local_path("cat.jpg") == "cat.jpg"
    assert local_path("C:/images/cat.jpg") == "C:/images/cat.jpg"
    assert local_path("https://example.com/cat.jpg") is None and local_path("data:image/png;base64,AA") is None


@contextmanager
def encoded_host():
    """/gzip-img: the PNG gzip-encoded; /gzip-bomb: 200 MB of zeros in ~200 KB of gzip, sent as gzip;
    /br: bytes claimed as brotli. Records the Accept-Encoding the fetcher sent."""
    import gzip

    bomb = gzip.compress(b"\0" * 200_000_000, compresslevel=9)
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Accept-Encoding"))
            body, coding = {"/gzip-img": (gzip.compress(PNG), "gzip"), "/gzip-bomb": (bomb, "gzip"),
                            "/br": (b"\x1b\xff\xff\x7f" * 200, "br")}[self.path]  # fmt: skip
            reply(self, 200, body, Content_Encoding=coding)

        def log_message(self, *args):
            pass

    with serve_http(Handler) as base:
        yield base, seen


def test_compressed_transfer_encodings_are_bounded_while_decoding():
    """An encoding bomb is refused by its decoded size without ever holding more than the limit."""
    import resource

    with encoded_host() as (host, seen):
        assert fetch(f"{host}/gzip-img", LoopbackOnly()) == PNG  # a server that gzips anyway still works
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(InvalidImageError, match="over the limit of 1,000,000 bytes"):
            fetch(f"{host}/gzip-bomb", LoopbackOnly(max_bytes=1_000_000))
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mb < 50, grown_mb  # 200 MB decoded would show here
        with pytest.raises(InvalidImageError, match="Content-Encoding 'br'"):
            fetch(f"{host}/br", LoopbackOnly())
    assert set(seen) == {"identity"}


def test_slow_downloads_do_not_hold_the_decode_slots():
    """Two image URLs that take long to download must not delay decoding another request's data URL."""

    class SlowFetcher:
        async def fetch(self, url):
            await asyncio.sleep(2.0)
            return PNG

    loader = ImageLoader(ImagePolicy(), fetcher=SlowFetcher(), concurrency=2)
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()

    async def scenario():
        slow = [asyncio.create_task(loader.load(f"https://example.com/{i}.png")) for i in range(2)]
        await asyncio.sleep(0.1)  # both downloads are under way
        start = time.monotonic()
        image = await loader.load(data_url)
        waited = time.monotonic() - start
        await asyncio.gather(*slow)
        return image, waited

    image, waited = asyncio.run(scenario())
    assert image == PNG and waited < 1.0, waited


def test_a_waiting_request_keeps_encoded_bytes_not_pixels(tmp_path):
    """A 6000x6000 one-bit PNG is ~50 KB on the wire but 108 MB decoded: a request waiting in the
    queue holds the bytes (checked: format, size, declared pixels), not the decoded image."""
    big = io.BytesIO()
    Image.new("1", (6000, 6000)).save(big, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()
    loader = ImageLoader(ImagePolicy(max_pixels=40_000_000))
    held = asyncio.run(loader.load(data_url))
    assert isinstance(held, bytes) and len(held) == len(big.getvalue()) < 200_000
    with pytest.raises(InvalidImageError, match="over the limit"):
        asyncio.run(ImageLoader(ImagePolicy(max_pixels=1_000_000)).load(data_url))  # declared size, no decode
