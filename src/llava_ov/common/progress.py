"""Progress reporting for long work: named phases with timings, on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Phases:
    """Announce numbered phases (`[2/6] tracing language model ... 3.1 s`)."""

    def __init__(self, task: str, total: int, stream: TextIO | None = None, enabled: bool = True):
        self.task, self.total, self.enabled = task, total, enabled
        self._stream = stream  # None: whatever sys.stderr is at write time
        self.done = 0
        self.timings: dict[str, float] = {}

    def _write(self, text: str) -> None:
        if self.enabled:
            stream = self._stream or sys.stderr
            stream.write(text)
            stream.flush()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.done += 1
        self._write(f"[{self.task} {self.done}/{self.total}] {name} ...")
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self._write(" failed\n")
            raise
        elapsed = time.perf_counter() - start
        self.timings[name] = elapsed
        self._write(f" done ({elapsed:.1f} s)\n")

    def note(self, text: str) -> None:
        self._write(f"[{self.task}] {text}\n")
