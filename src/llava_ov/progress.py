"""Progress reporting for long work: named phases with timings, on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Phases:
    """Announce numbered phases (`[2/6] tracing language model ... 3.1 s`)."""

    def __init__(self, task: str, total: int, stream: TextIO | None = sys.stderr, enabled: bool = True):
        self.task, self.total, self.stream, self.enabled = task, total, stream, enabled
        self.done = 0
        self.timings: dict[str, float] = {}

    def _write(self, text: str) -> None:
        if self.enabled and self.stream is not None:
            self.stream.write(text)
            self.stream.flush()

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
