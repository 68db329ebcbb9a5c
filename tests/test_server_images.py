"""Server image URLs: address checks (SSRF), redirects, size limits, data URLs, local paths (no model needed)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import ipaddress
import threading
from contextlib import contextmanager

import pytest

from llava_ov.errors import InvalidImageError
from llava_ov.server.images import ImageFetcher, ImagePolicy, decode_data_url, is_public_ip, local_path

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


class LoopbackOnly(ImagePolicy):
    """Lets the test server on 127.0.0.1 stand in for a public host; everything else private stays refused."""

    def ip_allowed(self, ip) -> bool:
        return ip == ipaddress.ip_address("127.0.0.1") or is_public_ip(ip)


@contextmanager
def image_host():
    """/img: a PNG; /big: 1 MB; /to-metadata: redirect to a link-local address; /to-img: redirect to /img."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/to-"):
                target = "http://169.254.169.254/latest" if self.path == "/to-metadata" else "/img"
                self.send_response(302)
                self.send_header("Location", target)
                self.end_headers()
                return
            body = PNG if self.path == "/img" else b"\0" * 1_000_000
            self.send_response(200 if self.path in ("/img", "/big") else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def fetch(url: str, policy: ImagePolicy) -> bytes:
    return asyncio.run(ImageFetcher(policy).fetch(url))


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
            fetch(f"{host}/img", ImagePolicy())
        assert fetch(f"{host}/img", ImagePolicy(allow_private_urls=True)) == PNG


def test_names_resolving_to_private_addresses_are_refused():
    async def resolver(host, port):  # a public-looking name whose DNS answer includes a private address
        return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.5")]

    with pytest.raises(InvalidImageError, match="private"):
        asyncio.run(ImageFetcher(ImagePolicy(), resolver).fetch("http://images.example/cat.png"))


def test_download_size_limit_and_http_errors():
    with image_host() as host:
        with pytest.raises(InvalidImageError, match="over the limit"):
            fetch(f"{host}/big", LoopbackOnly(max_bytes=100_000))
        with pytest.raises(InvalidImageError, match="404"):
            fetch(f"{host}/missing", LoopbackOnly())


@pytest.mark.parametrize("url", ["ftp://example.com/x.png", "http:///nohost", "http://[::1"])
def test_malformed_or_unsupported_urls(url):
    with pytest.raises(InvalidImageError):
        fetch(url, ImagePolicy())


def test_data_urls():
    assert decode_data_url("data:image/png;base64," + base64.b64encode(PNG).decode(), 10_000) == PNG
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
