"""MODEL arguments: an export directory, a local checkpoint, or a hub id converted on first use.

A hub id (or a transformers checkpoint directory) is converted — and its
language model compressed — once into the user cache
(`$XDG_CACHE_HOME/llava-ov/models/<name>-<format>`), with progress, the way
tools that pull models on demand behave; later runs reuse it.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
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


@dataclass(frozen=True)
class CachedModel:
    """One export in the models cache."""

    name: str  # its folder name (what `llava-ov models rm` takes)
    path: Path
    size_bytes: int
    source: str  # the hub id or checkpoint it was made from ("" when export_info.json is missing)
    family: str
    weight_format: str
    created: str
    complete: bool  # holds a language model (an interrupted conversion leaves none)


def cached_models(root: Path | None = None) -> list[CachedModel]:
    """Every export in the models cache, by name (no model is loaded)."""
    from llava_ov.runtime.export import ExportDir

    root = root or models_cache_dir()
    found = []
    for path in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        info = ExportDir(path).info or {}
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        found.append(CachedModel(
            path.name, path, size, str(info.get("source", "")), str(info.get("family", "")),
            str((info.get("compression") or {}).get("weight_format", "")), str(info.get("created", "")),
            (path / LANGUAGE_MODEL).exists(),
        ))  # fmt: skip
    return found


def remove_cached(name: str, root: Path | None = None) -> CachedModel:
    """Delete one export of the models cache by its name (ModelNotFoundError naming the cached ones)."""
    models = {m.name: m for m in cached_models(root)}
    if name not in models:
        known = ", ".join(models) or "none"
        raise ModelNotFoundError(f"no cached model named {name!r}; cached: {known} (see `llava-ov models`)")
    shutil.rmtree(models[name].path)
    return models[name]
