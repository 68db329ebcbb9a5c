"""Hardening, third round (issue 29): deeply nested JSON anywhere the server or the CLI parses JSON is a 400 (or
a one-line error) naming the limit, in bounded time, and the server stays healthy."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from conftest import F32
from llava_ov.frontends.server.app import create_app
from llava_ov.frontends.server.jsonparse import MAX_JSON_DEPTH
from llava_ov.frontends.server.settings import ServerSettings
from llava_ov.runtime.constrained import MAX_SCHEMA_DEPTH
from llava_ov.runtime.settings import LoadSettings
from test_server import HTTP, assert_error, assert_healthy, running, wait_ready

HELLO = [{"role": "user", "content": "Hello"}]


def nested(depth: int, leaf: str = "0") -> str:
    return "[" * depth + leaf + "]" * depth


def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.fixture(scope="module")
def server(exports):
    settings = ServerSettings(model=str(exports["llava"]), load=LoadSettings(properties=F32, cache_dir=None),
                              max_body_bytes=4 * 1024 * 1024)  # fmt: skip
    with running(create_app(settings)) as base:
        wait_ready(base)
        yield base


@pytest.mark.parametrize("depth, padding", [
    (100_000, 0),  # past the interpreter's recursion limit: json.loads itself gives up
    (MAX_JSON_DEPTH + 50, 0),  # parses, but deeper than a request may be
    (100_000, 2 * 1024 * 1024),  # a large body: parsed in the child process
])  # fmt: skip
def test_deeply_nested_bodies_are_a_400_naming_the_limit(server, depth, padding):
    body = '{"messages": %s, "padding": "%s", "extra": %s}' % (json.dumps(HELLO), "x" * padding, nested(depth))
    started = time.perf_counter()
    response = HTTP.post(f"{server}/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
    error = assert_error(response, 400, "request_too_complex")
    assert f"deeper than {MAX_JSON_DEPTH} levels" in error["message"] and time.perf_counter() - started < 5
    assert_healthy(server)


def test_a_deeply_nested_schema_is_a_400_naming_the_limit(server):
    body = {"messages": HELLO, "response_format": {"type": "json_schema",
                                                    "json_schema": {"name": "deep", "schema": nested_schema(80)}}}  # fmt: skip
    error = assert_error(HTTP.post(f"{server}/v1/chat/completions", json=body), 400, "invalid_json_schema")
    assert f"deeper than {MAX_SCHEMA_DEPTH} levels" in error["message"]
    assert_healthy(server)


def test_the_cli_refuses_a_deeply_nested_schema_file(exports, tmp_path, capsys):
    from llava_ov.cli import main

    for depth in (100_000, MAX_SCHEMA_DEPTH + 10):
        path = tmp_path / f"deep-{depth}.json"
        path.write_text(json.dumps(nested_schema(MAX_SCHEMA_DEPTH + 10)) if depth < 1000 else "{\"a\": " + nested(depth) + "}")
        assert main(["run", str(exports["llava"]), "--prompt", "hi", "--json-schema", str(path), "--f32"]) == 2
        err = capsys.readouterr().err
        assert f"deeper than {MAX_SCHEMA_DEPTH} levels" in err and "Traceback" not in err


def test_an_uncached_hub_id_offline_says_what_to_do(tmp_path):
    """With HF_HUB_OFFLINE=1, a hub id that is not cached is one line saying so and what to do (not
    huggingface_hub's "make sure your Internet connection is on")."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "LLAVA_OV_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "llava_ov.cli", "run", "someone/not-cached-model", "--prompt", "hi"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not in the local Hugging Face cache" in proc.stderr and "unset HF_HUB_OFFLINE" in proc.stderr
    assert "Internet connection" not in proc.stderr


# ---------------------------------------------------------------- many large images (class 3)


def one_bit_png(side: int) -> bytes:
    """A side x side one-bit PNG: a few KB that decode to side² RGB pixels (3 bytes each)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG")
    return out.getvalue()


def image_request(data: bytes, count: int) -> dict:
    import base64

    url = "data:image/png;base64," + base64.b64encode(data).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(count)]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe."}]}], "max_tokens": 4}


def test_a_request_declaring_too_many_pixels_in_all_is_a_400_before_any_decoding(server, monkeypatch):
    """Eight 6000 x 6000 images pass the per-image limit (40 Mpx) one by one; together they declare 288 Mpx
    (~860 MB as RGB): refused from their headers."""
    decoded = count_decodes(monkeypatch)
    error = assert_error(HTTP.post(f"{server}/v1/chat/completions", json=image_request(one_bit_png(6000), 8)), 400,
                         "invalid_image")  # fmt: skip
    assert "pixels" in error["message"] and "100,000,000" in error["message"] and not decoded
    assert_healthy(server)


def count_decodes(monkeypatch) -> list:
    """Every image the prompt builder decodes from now on is appended to the returned list."""
    import llava_ov.runtime.prompts as prompts

    decoded, load = [], prompts.load_image
    monkeypatch.setattr(prompts, "load_image", lambda src, **kw: decoded.append(src) or load(src, **kw))
    return decoded


@pytest.mark.parametrize("family", ["llava", "llava-next"])
def test_a_prompt_too_long_for_its_images_is_refused_before_any_image_is_decoded(exports, family, monkeypatch):
    """The images' token counts come from their headers: a prompt over the caller's limit or the context is
    refused before the first image is decoded (the refusal used to come after decoding all of them)."""
    from llava_ov.errors import ContextLengthError
    from llava_ov.runtime.generate import GenerationConfig
    from llava_ov.runtime.pipeline import Pipeline
    from llava_ov.runtime.prompts import Message

    pipe = Pipeline(exports[family], properties=F32, cache_dir=None)
    big = one_bit_png(2000)
    per_image = pipe.prompts.count_tokens([Message("user", "x", images=[big])]) - 1
    decoded = count_decodes(monkeypatch)
    messages = [Message("user", "Describe.", images=[big] * 3)]
    with pytest.raises(ContextLengthError, match="prompts of at most"):
        pipe.prepare(messages, GenerationConfig(), max_tokens=per_image * 2)
    with pytest.raises(ContextLengthError):
        pipe.prepare([Message("user", "Describe.", images=[big] * 40)], GenerationConfig())  # over the context
    assert not decoded
    decoded.clear()
    assert len(pipe.prepare([Message("user", "Describe.", images=[big])], GenerationConfig()).token_ids) > per_image
    assert len(decoded) == 1  # a prompt that fits decodes its image


@pytest.mark.parametrize("fmt, orientation", [("JPEG", 6), ("JPEG", 1), ("PNG", 8), ("WEBP", 5), ("TIFF", 7)])
def test_declared_sizes_are_the_upright_decoded_sizes(fmt, orientation):
    """A rotated photo's token count, computed from its header, uses the size it will have once upright."""
    import io

    from PIL import Image

    from llava_ov.runtime.image import EXIF_ORIENTATION, declared_size, load_image

    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    out = io.BytesIO()
    tags = {"tiffinfo": {EXIF_ORIENTATION: orientation}} if fmt == "TIFF" else {"exif": exif.tobytes()}
    Image.new("RGB", (300, 120), (10, 20, 30)).save(out, format=fmt, **tags)
    decoded = load_image(out.getvalue())
    assert declared_size(out.getvalue()) == (decoded.height, decoded.width)
    assert (decoded.height, decoded.width) == ((300, 120) if orientation >= 5 else (120, 300))


# ---------------------------------------------------------------- idle connections (class 2)


def open_idle(port: int, count: int, partial: bool = True) -> list:
    """`count` connections that send part of a request head (or nothing) and then wait."""
    import socket

    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if partial:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    return socks


def closed_by_server(sock) -> bool:
    import socket

    sock.settimeout(0.05)
    try:
        return sock.recv(100) == b""
    except (socket.timeout, BlockingIOError):
        return False
    except OSError:
        return True


@pytest.fixture(scope="module")
def reference_pipe(exports):
    from llava_ov.runtime.pipeline import Pipeline

    return Pipeline(exports["llava-next"], properties=F32, cache_dir=None)


def test_idle_connections_past_the_bound_make_room_for_new_clients(exports, reference_pipe):
    """Past --max-connections open sockets, a new client closes the connection idle longest (before: every new
    client, /health included, was a 503 until the header deadline); requests in progress are never closed."""
    settings = ServerSettings(model=str(exports["llava-next"]), max_connections=40, header_timeout_s=60)
    with running(create_app(settings, lambda: reference_pipe)) as base:
        # new clients each time (no pooled keep-alive connection: the flood closes idle ones, and a client
        # that reuses one the server just closed sees "disconnected without a response", as it should)
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/health", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.05)
        port = int(base.rsplit(":", 1)[1])
        idle = open_idle(port, 100)
        for _ in range(3):
            started = time.perf_counter()
            assert httpx.get(f"{base}/health", timeout=60).status_code == 200 and time.perf_counter() - started < 1
        assert_healthy(base)
        time.sleep(0.2)
        closed = [closed_by_server(s) for s in idle]
        assert all(closed[:60]) and sum(closed) < 100  # the oldest first; some of the newest stay open
        for sock in idle:
            sock.close()


def test_requests_in_progress_are_bounded_apart_from_sockets(exports, reference_pipe):
    """--max-requests bounds requests whose head has arrived (here bodies still being read): one more is a 503
    server_busy with Retry-After, /health still answers, and the slots come back when they end."""
    import socket

    settings = ServerSettings(model=str(exports["llava-next"]), max_requests=3, body_timeout_s=60)
    with running(create_app(settings, lambda: reference_pipe)) as base:
        wait_ready(base)
        port = int(base.rsplit(":", 1)[1])
        slow = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"messages\": [")  # fmt: skip
            slow.append(sock)
        time.sleep(0.3)
        response = HTTP.post(f"{base}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert_error(response, 503, "server_busy")
        assert response.headers["retry-after"] == "1"
        assert HTTP.get(f"{base}/health").status_code == 200
        for sock in slow:
            sock.close()
        time.sleep(0.3)
        assert_healthy(base)


def test_the_connection_book_closes_the_longest_idle_first():
    from llava_ov.frontends.server.http import ConnectionBook

    class Conn:
        closed = False

        def close_idle(self):
            self.closed = True

    book = ConnectionBook(limit=3)
    a, b, c, d, e = (Conn() for _ in range(5))
    for conn in (a, b, c):
        assert book.opened(conn)
    book.busy(a)  # a request in progress is never closed for room
    book.busy(b)
    book.idle_again(b)  # b answered: now the most recently idle
    assert book.opened(d) and c.closed and not a.closed and not b.closed
    assert book.opened(e) and b.closed
    book.busy(d)
    book.busy(e)
    assert not book.opened(Conn())  # everyone is busy: the new one is refused
    assert book.closed_for_room == 2 and len(book.open) == 3


def test_the_socket_bound_fits_the_open_file_limit(monkeypatch):
    """The soft open-file limit is raised toward the hard one; what still does not fit lowers the bound."""
    import resource

    from llava_ov.frontends.server.http import FILES_IN_RESERVE, sockets_allowed

    limits = {"soft": 1024, "hard": 4096}
    monkeypatch.setattr(resource, "getrlimit", lambda _: (limits["soft"], limits["hard"]))

    def setrlimit(_, pair):
        assert pair[1] == limits["hard"] and pair[0] <= limits["hard"]
        limits["soft"] = pair[0]

    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert sockets_allowed(2000) == 2000 and limits["soft"] == 2000 + FILES_IN_RESERVE
    assert sockets_allowed(10_000) == 4096 - FILES_IN_RESERVE and limits["soft"] == 4096
