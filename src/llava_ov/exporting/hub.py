"""MODEL arguments: an export directory, a local checkpoint, or a hub id pulled or converted on first use.

A hub repository that already holds an OpenVINO export (optimum-intel's file names) is pulled into the
user cache (`$XDG_CACHE_HOME/llava-ov/models/<name>-ov`) with huggingface_hub: only the export's files,
with progress, resumed after an interruption, checked, and run — no torch, no conversion. Any other hub
id (or a transformers checkpoint directory) is converted — and its language model compressed — once into
`<name>-<format>`, as tools that pull models on demand behave; later runs reuse either.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_ov.common.layout import LANGUAGE_MODEL, looks_like_path
from llava_ov.errors import LlavaOvError, ModelNotFoundError


def models_cache_dir() -> Path:
    base = os.environ.get("LLAVA_OV_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-ov"
    return Path(base) / "models"


PULLED_FORMAT = "ov"  # cache-name suffix of an export pulled as it is on the hub
# The files of an OpenVINO export on the hub (optimum-intel's names): the IRs, configs, tokenizer files, template
EXPORT_PATTERNS = ["openvino_*.xml", "openvino_*.bin", "*.json", "*.jinja"]
PULL_CHUNK_BYTES = 1 << 20  # written as they arrive: a killed pull keeps all but the last MiB


def hub_export_info(repo_id: str, revision: str | None = None) -> Any | None:
    """A hub repository's file list (with sizes) when it holds an OpenVINO export (its language model IR),
    else None (also offline, missing or gated: the conversion path then says why in its own words)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception:  # noqa: BLE001
        return None
    return info if any(s.rfilename == LANGUAGE_MODEL for s in info.siblings or []) else None


def pull_export(repo_id: str, target: Path, info: Any) -> Path:
    """Download a hub repository's OpenVINO export (its files only: EXPORT_PATTERNS; `info` from
    `hub_export_info`) into `target`, checked.

    Files land in `<target>.partial` as `<name>.part` first: a pull that was killed or lost its connection
    resumes each file from the bytes it has (HTTP Range) when run again. huggingface_hub finds the files
    and their URLs (HF_ENDPOINT, tokens, revisions); the byte loop is ours because huggingface_hub 1.x
    downloads each file to a fresh temporary name per process and so restarts it."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import tqdm

    from llava_ov.runtime.export import ExportDir

    try:
        files = [(s.rfilename, s.size) for s in info.siblings or [] if _export_file(s.rfilename)]
        partial = target.with_name(target.name + ".partial")
        print(f"{repo_id} holds an OpenVINO export; pulling it to {target} (no conversion) ...", flush=True)
        with tqdm(total=sum(size or 0 for _, size in files), unit="B", unit_scale=True, desc="pull") as bar:
            for name, size in files:
                _download(hf_hub_url(repo_id, name, revision=info.sha), partial / name, size, bar)
    except LlavaOvError:
        raise
    except Exception as exc:  # noqa: BLE001 - network or hub errors: one line, and how to go on
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise LlavaOvError(f"pulling {repo_id} failed ({type(exc).__name__}: {first}); run again to resume") from None
    ExportDir.open(partial)  # every required file is there, or a clear error (the partial folder stays)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target


def _export_file(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, pattern) for pattern in EXPORT_PATTERNS)


def _download(url: str, dest: Path, size: int | None, bar) -> None:
    """One file to `dest`, through `<dest>.part`, continuing the bytes a previous run left there."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers

    if dest.exists() and (size is None or dest.stat().st_size == size):
        bar.update(size or 0)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = build_hf_headers()
    if have:
        headers["Range"] = f"bytes={have}-"
    with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
        if have and response.status_code == 200:  # the server ignored the range: start over
            have = 0
        response.raise_for_status()
        bar.update(have)
        with part.open("ab" if have else "wb") as out:
            for chunk in response.iter_bytes(PULL_CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    if size is not None and part.stat().st_size != size:
        raise LlavaOvError(f"{dest.name}: got {part.stat().st_size} bytes, expected {size}; run again to resume")
    part.rename(dest)


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
    if not is_checkpoint:
        pulled = models_cache_dir() / cache_name(model, PULLED_FORMAT)
        if (pulled / LANGUAGE_MODEL).exists():
            return pulled
    target = models_cache_dir() / cache_name(str(path.resolve()) if is_checkpoint else model, weight_format)
    if (target / LANGUAGE_MODEL).exists():
        return target
    export_info = None if is_checkpoint else hub_export_info(model)
    if export_info is not None:
        return pull_export(model, pulled, export_info)
    try:
        import torch  # noqa: F401 - conversion needs both: fail here with the extra to install, not mid-way
        import transformers  # noqa: F401

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
