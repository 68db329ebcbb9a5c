"""Will a conversion or compression fit this machine?  Checked before any heavy work.

Peak memory and disk of `convert` / `compress` are estimated from the weights'
size and the chosen settings, with factors measured at full depth on the real
llava-v1.6-mistral-7b dimensions (scripts/full_depth.py, docs/conversion.md and
docs/compression.md).  Memory is split as measured:

- *file-backed*: memory-mapped weights (the checkpoint's safetensors while converting,
  the fp16 IR while compressing).  The kernel can drop and re-read those pages, so a
  machine with less free memory still finishes, only slower;
- *anonymous*: what the process allocates outright (tracing, compressed copies,
  calibration statistics).  Less than that free and the run ends in an out-of-memory kill.

So: available memory below the anonymous need (+ a working set) is refused with what
would fit; below the whole peak is a warning.  Free disk below what is written is
refused.  Available memory is the smaller of the system's MemAvailable and the room
left under a cgroup limit (containers).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from llava_ov.common.hardware import available_memory, cpu_inference_precision  # noqa: F401 (used and re-exported)
from llava_ov.errors import LlavaOvError

log = logging.getLogger("llava_ov")

GIB = 1024**3
GB = 1e9

# Measured factors (see the module docstring); bytes are of the weights as stored.  32-layer llava-v1.6-mistral-7b
# (15.1 GB fp16 checkpoint, 14.2 GB fp16 LM IR) on a 24 GiB machine: convert fp16 0.7 GiB anonymous + 14.2 GiB
# mapped; convert + INT4 + an answer 1.8 + 19.2; compress INT4 5.1 + 13.4; INT8 6.9 + 13.4.
CONVERT_ANON_FIXED = 1.5 * GIB  # tracing the vision tower + runtime, flat in depth
CONVERT_ANON_PER_BYTE = 0.02  # what grows with the weights (the LM's traced graph)
CONVERT_FILE_PER_BYTE = 1.0  # the whole checkpoint ends up mapped
COMPRESS_ANON_FIXED = 1.3 * GIB
COMPRESS_ANON_PER_BYTE = {"int4": 0.30, "int8": 0.45, "none": 0.0}  # of the fp16 LM IR: compressed copies
COMPRESS_FILE_PER_BYTE = 1.0  # the fp16 IR mapped by read_model
# AWQ / scale estimation: NNCF compiles the fp16 LM to collect activation statistics.  At the CPU's bf16 default
# that copy is one byte per fp16 IR byte (7B, 8 prompts: 18.3 GiB anonymous, 5.1 of it the INT4 pass); where the
# plugin runs f32 (no AVX-512-bf16/AMX) it would be two (not measured: no such machine here).
AWQ_COMPILED_PER_BYTE = {"bf16": 1.0, "f32": 2.0}
AWQ_ANON_PER_SAMPLE = 0.05 * GIB  # statistics per calibration prompt (7B)
PTQ_ANON_FIXED = 5.6 * GIB  # CLIP-L, one tile per sample: NNCF's range pass (SmoothQuant's pass: 2.1 GiB)
PTQ_ANON_PER_IMAGE = 0.01 * GIB  # statistics + preprocessed tiles per calibration image (+0.25 GiB over 50)
WORKING_SET = 1.0 * GIB  # file-backed pages that must stay resident to make progress
IR_PER_CHECKPOINT_BYTE = {"fp16": 1.0, "fp32": 2.0}  # IR size vs an fp16 checkpoint
COMPRESSED_PER_FP16_BYTE = {"int4": 0.36, "int8": 0.53, "none": 1.0}  # LM IR after compression (7B: 5.0 / 7.5 GB)


@dataclass(frozen=True)
class Scalable:
    """anon = fixed + per_item * count: e.g. calibration images (--calib-images)."""

    option: str
    fixed: float
    per_item: float
    count: int

    def largest_fitting(self, memory: int) -> int:
        """The largest count whose estimate (+ working set) fits `memory`."""
        return max(0, int((memory - WORKING_SET - self.fixed) // self.per_item))


@dataclass
class Need:
    """What a step is estimated to need, and what to try when it does not fit."""

    what: str
    anon_bytes: float
    file_bytes: float
    disk_bytes: float
    disk_path: Path
    memory_hints: list[str] = field(default_factory=list)
    scalable: Scalable | None = None  # a setting whose count the anonymous memory grows with

    @property
    def peak_bytes(self) -> float:
        return self.anon_bytes + self.file_bytes


def _existing_parent(path: Path) -> Path:
    """`path`, or its nearest parent that exists (where its file system's free space is read)."""
    probe = Path(path).expanduser().resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_disk(path: Path) -> int:
    """Free bytes on the file system that will hold `path` (its nearest existing parent)."""
    return shutil.disk_usage(_existing_parent(path)).free


def convert_need(weight_bytes: float, source_dtype_bytes: int, weight_format: str, out: Path,
                 lm_share: float) -> Need:  # fmt: skip
    """convert (+ INT4/INT8 compression of the language model when asked) of a checkpoint."""
    fp16_ir = weight_bytes * 2 / source_dtype_bytes
    ir = fp16_ir * IR_PER_CHECKPOINT_BYTE.get(weight_format, 1.0)
    anon = CONVERT_ANON_FIXED + CONVERT_ANON_PER_BYTE * weight_bytes
    if source_dtype_bytes == 4 and weight_format != "fp32":  # fp32 weights: their fp16 copies made in memory
        anon += 0.5 * weight_bytes
    mode = weight_format if weight_format in ("int4", "int8") else "none"
    if mode != "none":  # compressed in place right after: the fp16 IR mapped, the compressed copy beside it
        anon = max(anon, COMPRESS_ANON_FIXED + COMPRESS_ANON_PER_BYTE[mode] * fp16_ir * lm_share)
    disk = ir + (fp16_ir * lm_share * COMPRESSED_PER_FP16_BYTE[mode] if mode != "none" else 0)
    hints = ["close other programs or use a machine with more memory",
             "convert on a bigger machine and copy the export folder here (running it needs much less)"]  # fmt: skip
    return Need(f"converting ({weight_format})", anon, CONVERT_FILE_PER_BYTE * weight_bytes, disk, out, hints)


def compress_need(lm_bytes: float, other_bytes: float, lm_mode: str, out: Path, *, awq_samples: int = 0,
                  ptq_images: int = 0, in_place: bool = False) -> Need:  # fmt: skip
    """compress of an fp16 export: language model IR of `lm_bytes`, the other files `other_bytes`."""
    mode = "int4" if lm_mode.startswith("int4") else lm_mode
    lm_anon = COMPRESS_ANON_FIXED + COMPRESS_ANON_PER_BYTE.get(mode, 0.0) * lm_bytes
    hints, scalable = [], None
    anon = lm_anon
    if awq_samples:
        compiled = AWQ_COMPILED_PER_BYTE[cpu_inference_precision()] * lm_bytes
        scalable = Scalable("--calib-samples", lm_anon + compiled, AWQ_ANON_PER_SAMPLE, awq_samples)
        anon = lm_anon + compiled + AWQ_ANON_PER_SAMPLE * awq_samples
        hints.append("data-free INT4 (leave out --awq)")
    if ptq_images:
        ptq = PTQ_ANON_FIXED + PTQ_ANON_PER_IMAGE * ptq_images
        if ptq > anon:  # the vision pass is the larger need (they run one after the other)
            scalable, anon = Scalable("--calib-images", PTQ_ANON_FIXED, PTQ_ANON_PER_IMAGE, ptq_images), ptq
        hints.append("weight-only INT8 for the vision encoder (--vision int8)")
    hints.append("close other programs or use a machine with more memory")
    written = lm_bytes * COMPRESSED_PER_FP16_BYTE.get(mode, 1.0) + (0 if in_place else other_bytes)
    file_backed = COMPRESS_FILE_PER_BYTE * lm_bytes if mode != "none" else 0.0
    return Need(f"compressing ({lm_mode})", anon, file_backed, written, out, hints, scalable)


def check(need: Need, *, memory: int | None = None, disk: int | None = None) -> None:
    """Refuse (LlavaOvError) what cannot fit; warn where it fits only by re-reading weights from disk."""
    memory = available_memory() if memory is None else memory
    disk = free_disk(need.disk_path) if disk is None else disk
    problems = []
    if disk < need.disk_bytes:
        problems.append(f"it writes about {_size(need.disk_bytes)} to {_existing_parent(need.disk_path)}, "
                        f"which has {_size(disk)} free: free space there or write the output to another disk")  # fmt: skip
    if memory < need.anon_bytes + WORKING_SET:
        tries = "; ".join(_fitting_hint(need.scalable, memory) + need.memory_hints)
        problems.append(f"it needs about {(need.anon_bytes + WORKING_SET) / GIB:.1f} GiB of memory outright "
                        f"(peak about {need.peak_bytes / GIB:.1f} GiB with the mapped weights) and "
                        f"{memory / GIB:.1f} GiB is available: {tries}")  # fmt: skip
    if problems:
        raise LlavaOvError(f"{need.what} will not fit this machine: " + "; and ".join(problems)
                           + " (`llava-ov convert` / `compress --skip-resource-check` runs it anyway)")  # fmt: skip
    if memory < need.peak_bytes:
        log.warning("%s peaks at about %.1f GiB and %.1f GiB is available: it will re-read weights from disk "
                    "(slower, but it fits)", need.what, need.peak_bytes / GIB, memory / GIB)  # fmt: skip


def _size(nbytes: float) -> str:
    """Bytes for a message: '15.1 GB' or '17 MB'."""
    return f"{nbytes / GB:.1f} GB" if nbytes >= GB else f"{nbytes / 1e6:.0f} MB"


def _fitting_hint(scalable: Scalable | None, memory: int) -> list[str]:
    if scalable is None:
        return []
    fits = scalable.largest_fitting(memory)
    if fits < 1:
        return []
    return [f"{scalable.option} {fits} would fit (asked: {scalable.count})"]
