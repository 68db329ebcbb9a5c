"""The HTTP layer's own bounds: header size and read time, idle keep-alive, open sockets.

The Docker image serves uvicorn directly (no proxy in front), so slow or hostile clients must
be bounded here: h11 (bounded header buffer, unlike httptools) with a header deadline per
request, uvicorn's keep-alive timeout, and a bound on open sockets that makes room for a new
client by closing the connection idle longest (one waiting for a request's head: a keep-alive
connection or one whose head is incomplete), so idle sockets never lock new clients out.
Requests in progress are bounded apart, by `guards.RequestLimit`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


_BODY = b"request headers are too large\n"
TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY))  # fmt: skip


_BUSY_BODY = b"the server has no room for another connection; retry shortly\n"
NO_ROOM = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\nretry-after: 1\r\n"
           b"content-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))  # fmt: skip


class ConnectionBook:
    """One server's open connections, and the idle ones (waiting for a request's head) longest idle first."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: set[Any] = set()
        self.idle: OrderedDict[Any, None] = OrderedDict()
        self.closed_for_room = 0  # idle connections closed to make room (a sign of too many idle clients)

    def opened(self, conn: Any) -> bool:
        """Count a new connection, idle until its first head; past the limit close the longest-idle other one.
        False when every other connection has a request in progress (the caller refuses the new one)."""
        self.open.add(conn)
        self.idle[conn] = None
        if len(self.open) <= self.limit:
            return True
        victim = next((c for c in self.idle if c is not conn), None)
        if victim is None:
            self.closed(conn)
            return False
        self.closed(victim)
        self.closed_for_room += 1
        victim.close_idle()
        return True

    def busy(self, conn: Any) -> None:
        """A request's head arrived on `conn`."""
        self.idle.pop(conn, None)

    def idle_again(self, conn: Any) -> None:
        """`conn` answered its request and waits for the next one (now the most recently idle)."""
        if conn in self.open:
            self.idle[conn] = None
            self.idle.move_to_end(conn)

    def closed(self, conn: Any) -> None:
        self.open.discard(conn)
        self.idle.pop(conn, None)


class GuardedH11Protocol(H11Protocol):
    """h11 with a deadline for a request's headers (a client that trickles them is disconnected) and a place
    in its server's `ConnectionBook`."""

    header_timeout_s = 10.0  # all three set per server by `uvicorn_config` (a subclass per app)
    max_header_bytes = 64 * 1024
    book = ConnectionBook(10_000)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.book.opened(self):
            transport.write(NO_ROOM)
            transport.close()
            return
        self._arm_header_deadline()

    def close_idle(self) -> None:
        """Close this idle connection to make room for a new one."""
        self._disarm_header_deadline()
        if not self.transport.is_closing():
            self.transport.close()

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
            self.book.busy(self)

    def _head_too_large(self, data: bytes) -> bool:
        """h11 bounds only an *incomplete* head; one that arrives whole in a single read is counted here."""
        end = data.find(b"\r\n\r\n")
        self._head_bytes = getattr(self, "_head_bytes", 0) + (len(data) if end < 0 else end)
        return self._head_bytes > self.max_header_bytes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.book.idle_again(self)
            self._arm_header_deadline()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        self.book.closed(self)
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


FILES_IN_RESERVE = 256  # descriptors kept for the model's files, image downloads, logs and the like


def sockets_allowed(wanted: int) -> int:
    """How many of `wanted` open sockets the process's file limit allows, raising its soft limit toward the
    hard one first (Unix; elsewhere `wanted`)."""
    try:
        import resource
    except ImportError:
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FILES_IN_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else max(1, min(wanted, soft - FILES_IN_RESERVE))


def uvicorn_config(app: Any, settings: Any, **options: Any) -> Any:
    """uvicorn.Config for `app` with the server's connection bounds (`ServerSettings`)."""
    import uvicorn

    bounds = {"header_timeout_s": settings.header_timeout_s, "max_header_bytes": settings.max_header_bytes,
              "book": ConnectionBook(settings.max_connections)}  # fmt: skip
    protocol = type("Guarded", (GuardedH11Protocol,), bounds)
    return uvicorn.Config(
        app, http=protocol, h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_s, backlog=max(2048, settings.max_connections), **options,
    )  # fmt: skip
