"""Write an output directory atomically: build it in a hidden sibling, rename it into place when complete.

A failed or interrupted conversion/compression never leaves a half-written
export behind, and an existing export is replaced only once the new one is whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llava_ov.errors import ExportExistsError


def staging_dir(out: Path, overwrite: bool) -> Path:
    """Refuse a non-empty `out` unless overwriting; return an empty hidden sibling to write into."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportExistsError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def publish(stage: Path, out: Path) -> None:
    """Move a finished `stage` to `out`, removing what was there only now."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)
