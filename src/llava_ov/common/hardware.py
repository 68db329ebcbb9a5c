"""What this machine can do: its CPU's flags (read once from /proc/cpuinfo) and the memory left to this process."""

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


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def matrix_flags() -> list[str]:
    """The CPU flags that decide OpenVINO's kernels (AVX2, AVX-512, VNNI, bf16, AMX)."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


def int8_matrix_units() -> list[str]:
    """The int8 matrix units this CPU has (AMX-INT8, AVX-512 VNNI, AVX-VNNI), best first."""
    flags = cpu_flags()
    return [f for f in INT8_MATRIX_FLAGS if f in flags]


def cpu_inference_precision() -> str:
    """"bf16" where OpenVINO's CPU plugin computes in bf16 by default (AVX-512-bf16 / AMX), else "f32"."""
    return "bf16" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "f32"


def available_memory() -> int:
    """Bytes this process can still get: MemAvailable, capped by a cgroup limit (v2 or v1)."""
    import psutil

    available = psutil.virtual_memory().available
    room = _cgroup_room()
    return min(available, room) if room is not None else available


def _cgroup_room(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes that can still be allocated under this process's cgroup memory limit, or None (no limit).

    The limit minus the group's anonymous memory (v2 memory.stat `anon`, v1 `total_rss`): page cache
    counts toward the limit too, but the kernel reclaims it before it kills (a freshly written IR
    filled a 16 GiB group to its limit with cache while little was allocated).
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2
            folder, limit_name, anon_key = Path(f"{root}{path}"), "memory.max", "anon"
        elif "memory" in controllers.split(","):  # v1
            folder, limit_name, anon_key = Path(f"{root}/memory{path}"), "memory.limit_in_bytes", "total_rss"
        else:
            continue
        try:
            limit = (folder / limit_name).read_text().strip()
            stat = dict(ln.split() for ln in (folder / "memory.stat").read_text().splitlines() if ln.strip())
            anon = int(stat[anon_key])
        except (OSError, ValueError, KeyError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" / a huge number: no limit
            return max(0, int(limit) - anon)
    return None
