"""Measuring helpers the benchmarks share: mean ± std, a process's peak RSS, and the machine's description."""

from __future__ import annotations

import os
import statistics
import threading
from dataclasses import dataclass
from typing import Any


@dataclass
class Stat:
    mean: float
    std: float
    n: int

    def fmt(self, scale: float = 1.0, digits: int = 1) -> str:
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


def summarize(values: list[float]) -> Stat:
    vals = [float(v) for v in values]
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


# ---------------------------------------------------------------- memory


class RssSampler:
    """Samples this process's RSS in a thread; `.peak` in bytes."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self._proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def machine_info() -> dict[str, Any]:
    import platform

    import openvino as ov

    from llava_ov.common.hardware import matrix_flags

    cpu = ov.Core().get_property("CPU", "FULL_DEVICE_NAME")
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_flags": matrix_flags(), "python": platform.python_version(),
            "openvino": ov.__version__}  # fmt: skip


def save_seconds_plot(fig, ax, path, xlabel: str, title: str, machine: dict[str, Any]) -> None:
    """Label a seconds-vs-something plot, name the machine in its title, save it and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds")
    ax.set_title(f"{title} ({machine.get('cpu', 'CPU')}, {machine.get('cores', '?')} cores)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
