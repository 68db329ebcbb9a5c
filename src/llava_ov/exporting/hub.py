"""MODEL arguments: an export directory, a local checkpoint, or a hub id converted on first use.

A hub id (or a transformers checkpoint directory) is converted — and its
language model compressed — once into the user cache
(`$XDG_CACHE_HOME/llava-ov/models/<name>-<format>`), with progress, the way
tools that pull models on demand behave; later runs reuse it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llava_ov.common.layout import LANGUAGE_MODEL, looks_like_path
from llava_ov.errors import LlavaOvError, ModelNotFoundError


def models_cache_dir() -> Path:
    base = os.environ.get("LLAVA_OV_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-ov"
    return Path(base) / "models"


def cache_name(source: str, weight_format: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "--", source.strip("/").replace(os.sep, "/"))
    return f"{safe}-{weight_format}"


def resolve_model(model: str, weight_format: str = "int4") -> Path:
    """Path of a ready export for `model`, converting it first if needed."""
    path = Path(model).expanduser()
    if (path / LANGUAGE_MODEL).exists():
        return path
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path} is neither a llava-ov export nor a transformers checkpoint")
    is_checkpoint = path.is_dir()
    if not is_checkpoint and looks_like_path(model):
        raise ModelNotFoundError(f"no such model directory: {model}")
    target = models_cache_dir() / cache_name(str(path.resolve()) if is_checkpoint else model, weight_format)
    if (target / LANGUAGE_MODEL).exists():
        return target
    try:
        from llava_ov.exporting.convert import ConvertOptions, convert
    except ImportError as exc:
        raise LlavaOvError(
            f"converting {model} needs the conversion extra: pip install 'llava-ov[convert]' ({exc.name} missing)"
        ) from None
    print(f"{model} is not converted yet; converting to {target} (once) ...", flush=True)
    return convert(model, target, ConvertOptions(weight_format=weight_format, overwrite=True))
