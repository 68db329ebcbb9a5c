"""The HTTP layer's own bounds: header size and read time, idle keep-alive, concurrent connections.

The Docker image serves uvicorn directly (no proxy in front), so slow or hostile clients must
be bounded here: h11 (bounded header buffer, unlike httptools) with a header deadline per
request, uvicorn's keep-alive timeout, and `limit_concurrency` (503 beyond it).
"""

from __future__ import annotations

from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


_BODY = b"request headers are too large\n"
TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY))  # fmt: skip


class GuardedH11Protocol(H11Protocol):
    """h11 with a deadline for a request's headers: a client that trickles them is disconnected."""

    header_timeout_s = 10.0  # both set per server by `uvicorn_config` (a subclass per app)
    max_header_bytes = 64 * 1024

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._header_deadline = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self.transport.write(TOO_LARGE)
            self.transport.close()
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole request head has arrived
            self._disarm_header_deadline()
            self._head_bytes = 0

    def _head_too_large(self, data: bytes) -> bool:
        """h11 bounds only an *incomplete* head; one that arrives whole in a single read is counted here."""
        end = data.find(b"\r\n\r\n")
        self._head_bytes = getattr(self, "_head_bytes", 0) + (len(data) if end < 0 else end)
        return self._head_bytes > self.max_header_bytes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: Any, settings: Any, **options: Any) -> Any:
    """uvicorn.Config for `app` with the server's connection bounds (`ServerSettings`)."""
    import uvicorn

    bounds = {"header_timeout_s": settings.header_timeout_s, "max_header_bytes": settings.max_header_bytes}
    protocol = type("Guarded", (GuardedH11Protocol,), bounds)
    return uvicorn.Config(
        app, http=protocol, h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive_s, **options,
    )  # fmt: skip
