"""ASGI middleware that guards requests before any body is parsed: API key, requests in progress, then body
size and time.

The key is compared in constant time (`hmac.compare_digest`).  The body limit
checks Content-Length first, then counts the bytes actually received (chunked
uploads), buffering at most `max_body_bytes` before the app sees the request, and
answers 408 to a body that has not arrived within `timeout_s` (a client trickling
it would otherwise hold its connection and request slot forever);
the app then reads the buffered body and, after it, the live `receive` (so it
can still notice the client disconnecting).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from llava_ov.frontends.server.errors import send_error


def bearer_token(scope: dict) -> bytes:
    """The raw token of an `Authorization: Bearer ...` header (b"" when absent)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


class APIKeyGuard:
    """Requires `Authorization: Bearer KEY` on paths under `prefix` when a key is set."""

    def __init__(self, app: Any, api_key: str | None, prefix: str = "/v1/"):
        self.app, self.prefix = app, prefix
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.key is not None and scope["path"].startswith(self.prefix):
            given = bearer_token(scope)
            if not hmac.compare_digest(given, self.key):
                problem = "missing API key" if not given else "invalid API key"
                message = f"{problem} (send Authorization: Bearer KEY)"
                return await send_error(send, 401, message, code="invalid_api_key")
        await self.app(scope, receive, send)


class RequestLimit:
    """Answers 503 (`Retry-After: 1`) beyond `max_requests` requests in progress (head arrived, response not
    finished: bodies being read, requests waiting for or in the engine, streams). Open sockets are bounded
    apart (`http.ConnectionBook`); `exempt` paths (the health probe) are cheap and always answered."""

    def __init__(self, app: Any, max_requests: int, exempt: tuple[str, ...] = ("/health",)):
        self.app, self.max_requests, self.exempt = app, max_requests, exempt
        self.active = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        if self.active >= self.max_requests:
            message = f"the server has {self.max_requests} requests in progress, its limit; retry shortly"
            return await send_error(send, 503, message, retry_after_s=1, code="server_busy")
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class BodyLimit:
    """Answers 413 to bodies over `max_bytes`, declared or actually sent, and 408 to bodies slower than
    `timeout_s`."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = 30.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except asyncio.TimeoutError:
            message = f"the request body did not arrive within {self.timeout_s:g} s"
            return await send_error(send, 408, message, code="body_timeout")
        if body is None:  # the client left while sending
            return
        if len(body) > self.max_bytes:
            return await self._refuse(send)
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Any) -> bytes | None:
        """The whole body (stopping once it is over the limit), or None when the client disconnected."""
        body, more = bytearray(), True
        while more and len(body) <= self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
        return bytes(body)

    async def _refuse(self, send: Any) -> None:
        message = f"request body is over the limit of {self.max_bytes:,} bytes"
        await send_error(send, 413, message, code="body_too_large")


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that returns the buffered body once, then the live messages (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
