"""ASGI middleware that guards requests before any body is parsed: API key, then body size.

The key is compared in constant time (`hmac.compare_digest`).  The body limit
checks Content-Length first, then counts the bytes actually received (chunked
uploads), buffering at most `max_body_bytes` before the app sees the request;
the app then reads the buffered body and, after it, the live `receive` (so it
can still notice the client disconnecting).
"""

from __future__ import annotations

import hmac
from typing import Any

from .errors import send_error


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


class BodyLimit:
    """Answers 413 to bodies over `max_bytes`, declared or actually sent."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(send)
        await self.app(scope, _replay(bytes(body), receive), send)

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
