"""What this machine's CPU can do, read once from /proc/cpuinfo (empty where there is none)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

INT8_MATRIX_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # int8 dot-product units OpenVINO's CPU kernels use


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty when they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def matrix_flags() -> list[str]:
    """The CPU flags that decide OpenVINO's kernels (AVX2, AVX-512, VNNI, bf16, AMX)."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


def int8_matrix_units() -> list[str]:
    """The int8 matrix units this CPU has (AMX-INT8, AVX-512 VNNI, AVX-VNNI), best first."""
    flags = cpu_flags()
    return [f for f in INT8_MATRIX_FLAGS if f in flags]
