"""Request bodies as JSON, bounded in structure, and parsed away from the event loop's GIL.

`json.loads` holds the GIL: parsed in a thread, a 28 MB body of 800,000 messages still froze
the event loop (/health) for ~0.3 s. Bodies over `OFFLOAD_BYTES` are parsed in a child process
that also counts the JSON values and refuses a body with more than `MAX_JSON_VALUES` (a real
request has a few per message; its bulk is image data URLs, which are single strings), so the
server process only ever unpickles what it would accept. Imports only the standard library
(the child process loads just this module).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

OFFLOAD_BYTES = 1 << 20  # smaller bodies parse in well under a millisecond: inline
MAX_JSON_VALUES = 100_000  # objects, arrays and scalars together; 1,024 messages need ~10,000
MAX_JSON_DEPTH = 100  # nesting; a request is ~6 deep, a JSON schema inside it rarely 30


class TooManyValues(ValueError):
    """The body holds more JSON values than a request may."""

    def __init__(self, count: int, limit: int):
        super().__init__(count, limit)
        self.count, self.limit = count, limit

    def __str__(self) -> str:
        return f"the request body has more than {self.limit:,} JSON values (at least {self.count:,})"


def exit_with_parent() -> None:
    """Child-process initializer: exit once the server that started it is gone (however it ended)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class TooDeep(ValueError):
    """The body nests JSON values deeper than a request may."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return f"the request body nests JSON deeper than {self.limit} levels"


def parse_limited(body: bytes, max_values: int = MAX_JSON_VALUES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads, then TooManyValues / TooDeep when the result holds more than `max_values` values or
    nests deeper than `max_depth` (json.loads itself gives up past the interpreter's recursion limit:
    that is TooDeep too, found in bounded time and memory)."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise TooDeep(max_depth) from None
    count, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > max_values:
            raise TooManyValues(count, max_values)
        if depth > max_depth:
            raise TooDeep(max_depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value
