"""Image features cached by content: a small LRU, safe across threads, that encodes each new image once.

Its lock guards only lookups and inserts, never an encoding. Two requests for the same new
image at once: the first encodes it, the second waits for that result (an in-flight map).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class FeatureCache(Generic[T]):
    """At most `size` entries by key (and, with `weigh`, at most `max_bytes` of them), least recently used
    dropped first; the newest entry stays even when it alone is over `max_bytes`."""

    def __init__(self, size: int, max_bytes: int | None = None, weigh: Callable[[T], int] | None = None):
        self.size = size
        self.max_bytes, self.weigh = max_bytes, weigh
        self._bytes = 0
        self._entries: OrderedDict[str, T] = OrderedDict()
        self._pending: dict[str, Future[T]] = {}  # keys being encoded now
        self._lock = threading.Lock()

    def get(self, key: str) -> T | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def get_or_make(self, key: str, make: Callable[[], T]) -> T:
        """The cached value, else the one another thread is making now, else `make()` (cached)."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
            pending = self._pending.get(key)
            if pending is None:
                mine = self._pending[key] = Future()
        if pending is not None:
            return pending.result()
        try:
            value = make()
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            mine.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            self._entries[key] = value
            self._bytes += self._weight(value)
            while len(self._entries) > 1 and (len(self._entries) > self.size or self._over_budget()):
                self._bytes -= self._weight(self._entries.popitem(last=False)[1])
        mine.set_result(value)
        return value

    def _weight(self, value: T) -> int:
        return self.weigh(value) if self.weigh is not None else 0

    def _over_budget(self) -> bool:
        return self.max_bytes is not None and self._bytes > self.max_bytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
