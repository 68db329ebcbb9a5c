"""The one reader of an export directory: every file of an export is parsed here, once.

`ExportDir` checks that a folder is an export, then reads on demand (and caches)
config.json, generation_config.json, export_info.json (tolerant: `{}` when absent
or unreadable, as exports of other tools have none), the image-processor settings
(preprocessor_config.json, else transformers 5's processor_config.json), the chat
template and special tokens, tokenizer.json, and knows the path of every part.
Writers (convert, quantize) still write export_info.json through `layout.ExportInfo`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from llava_ov.common import layout
from llava_ov.errors import LlavaOvError, ModelNotFoundError, UnsupportedModelError

REQUIRED_FILES = (layout.LANGUAGE_MODEL, layout.TEXT_EMBEDDINGS_MODEL, layout.VISION_MODEL, "config.json")
IMAGE_SETTINGS_FILES = ("preprocessor_config.json", "processor_config.json")
VIDEO_SETTINGS_FILE = "video_preprocessor_config.json"
TEMPLATE_FILES = ("chat_template.json", "processor_config.json", "tokenizer_config.json")
SPECIAL_TOKEN_FILES = ("special_tokens_map.json", "tokenizer_config.json")
TOKENIZER_JSON = "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


# ----------------------------------------------------------------------------- image settings


def _size_dict(value: Any, square: bool) -> dict[str, int]:
    """A transformers size setting (int, [h, w] or dict) as a dict, like get_size_dict."""
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if v is not None}
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    raise UnsupportedModelError(f"unsupported image size setting {value!r} in the preprocessor config")


def _check_resize_setting(size: dict[str, int]) -> None:
    """The resize settings image.py can follow: a shortest edge alone, or height and width."""
    if not (("shortest_edge" in size and "longest_edge" not in size) or ("height" in size and "width" in size)):
        raise UnsupportedModelError(f"unsupported image size setting {size!r} in the preprocessor config")


@dataclass(frozen=True)
class ImageConfig:
    """The image-processor settings of a checkpoint (preprocessor_config.json)."""

    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})
    crop_size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    do_convert_rgb: bool = True  # always done: the vision tower takes RGB
    do_pad: bool = True  # batch padding of the tile count; no effect on one image
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    image_processor_type: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> ImageConfig:
        """From a preprocessor_config.json dict or a transformers-5 processor_config.json dict."""
        if isinstance(d.get("image_processor"), dict):
            d = d["image_processor"]
        kw: dict[str, Any] = {k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None}
        if "size" in kw:
            kw["size"] = _size_dict(kw["size"], square=False)
        if "crop_size" in kw:
            kw["crop_size"] = _size_dict(kw["crop_size"], square=True)
        elif not kw.get("do_center_crop"):  # SigLIP-style: resized to its size, nothing cropped, tiles of size
            kw["do_center_crop"], kw["crop_size"] = False, {}
        for key in ("image_mean", "image_std"):
            if key in kw:
                kw[key] = tuple(float(v) for v in (kw[key] if isinstance(kw[key], (list, tuple)) else [kw[key]] * 3))
        if "image_grid_pinpoints" in kw:
            kw["image_grid_pinpoints"] = tuple((int(h), int(w)) for h, w in kw["image_grid_pinpoints"])
        cfg = cls(**kw)
        _check_resize_setting(cfg.size)  # reject an unsupported size setting now, not at the first image
        return cfg

    @classmethod
    def from_export(cls, export_dir: str | Path) -> ImageConfig:
        """The image settings of an export folder (see `ExportDir.image_config`)."""
        return ExportDir(export_dir).image_config

    @property
    def base_size(self) -> tuple[int, int]:
        """(height, width) the whole image is resized to for the anyres base tile."""
        if "height" in self.size and "width" in self.size:
            return self.size["height"], self.size["width"]
        if "shortest_edge" in self.size:
            return self.size["shortest_edge"], self.size["shortest_edge"]
        raise UnsupportedModelError(f"unsupported image size setting {self.size!r} in the preprocessor config")

    @property
    def patch_size(self) -> int:
        """Side of an anyres grid tile (crop height, else size height, else shortest edge)."""
        return self.crop_size.get("height") or self.size.get("height") or self.size["shortest_edge"]


# ----------------------------------------------------------------------------- the reader


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _eos_values(cfg: dict[str, Any]) -> list[int]:
    value = cfg.get("eos_token_id")
    return value if isinstance(value, list) else [value] if value is not None else []


class ExportDir:
    """An export directory: each file parsed once, on first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    @classmethod
    def open(cls, path: str | Path) -> ExportDir:
        """An export directory with every required file, or a clear ModelNotFoundError."""
        export = cls(path)
        if not export.path.is_dir():
            raise ModelNotFoundError(f"no such model directory: {export.path}")
        missing = [name for name in REQUIRED_FILES if not (export.path / name).exists()]
        if missing:
            raise ModelNotFoundError(
                f"{export.path} is not a llava-ov export (missing {', '.join(missing)}); "
                "create one with `llava-ov convert`"
            )
        return export

    @classmethod
    def of(cls, export: ExportDir | str | Path) -> ExportDir:
        """`export` itself, or a reader of the folder it names (no check)."""
        return export if isinstance(export, ExportDir) else cls(export)

    def __repr__(self) -> str:
        return f"ExportDir({str(self.path)!r})"

    # ------------------------------------------------------------ configs

    @cached_property
    def config(self) -> dict[str, Any]:
        """config.json (the full transformers config, plus what convert adds)."""
        path = self.path / "config.json"
        if not path.is_file():
            raise ModelNotFoundError(f"{self.path} has no config.json")
        return _read(path)

    @property
    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config", {})

    @cached_property
    def generation_config(self) -> dict[str, Any]:
        """generation_config.json ({} when absent)."""
        path = self.path / GENERATION_CONFIG
        return _read(path) if path.is_file() else {}

    @cached_property
    def info(self) -> dict[str, Any]:
        """export_info.json ({} when absent or unreadable: exports of other tools have none)."""
        path = self.path / layout.EXPORT_INFO
        try:
            data = _read(path) if path.is_file() else {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def name(self) -> str:
        """The model's name wherever it is shown: the hub id it was made from, else the export folder's name."""
        source = str(self.info.get("source") or "")
        if source and not layout.looks_like_path(source) and source.count("/") == 1:
            return source
        return self.path.resolve().name

    def record(self) -> layout.ExportInfo | None:
        """export_info.json as the typed record the writers use (None when there is none)."""
        info = self.info
        if not info:
            return None
        return layout.ExportInfo(**{k: v for k, v in info.items() if k in layout.ExportInfo.__dataclass_fields__})

    @property
    def notes(self) -> list[str]:
        """Things a user must know about this export (e.g. random demo weights)."""
        return list(self.info.get("notes", []))

    @cached_property
    def image_config(self) -> ImageConfig:
        """The image-processor settings: preprocessor_config.json, else processor_config.json."""
        for name in IMAGE_SETTINGS_FILES:
            path = self.path / name
            if path.is_file():
                return ImageConfig.from_dict(_read(path))
        raise ModelNotFoundError(f"{self.path} has no preprocessor_config.json or processor_config.json")

    @cached_property
    def video_config(self) -> ImageConfig:
        """The video processor's per-frame settings: video_preprocessor_config.json (or processor_config.json's
        "video_processor"), else the image settings (as transformers' video processor falls back to them)."""
        path = self.path / VIDEO_SETTINGS_FILE
        if path.is_file():
            return ImageConfig.from_dict(_read(path))
        processor = self.path / "processor_config.json"
        if processor.is_file():
            video = _read(processor).get("video_processor")
            if isinstance(video, dict):
                return ImageConfig.from_dict(video)
        return self.image_config

    def eos_ids(self) -> set[int]:
        """End-of-sequence ids from generation_config.json, the text config and config.json."""
        ids: set[int] = set()
        for cfg in (self.generation_config, self.text_config, self.config):
            ids.update(_eos_values(cfg))
        return ids

    # ------------------------------------------------------------ chat template and tokenizer

    @cached_property
    def chat_template(self) -> str:
        """The template from chat_template.jinja, chat_template.json, processor or tokenizer config."""
        if (self.path / layout.CHAT_TEMPLATE).exists():
            return (self.path / layout.CHAT_TEMPLATE).read_text()
        for name in TEMPLATE_FILES:
            path = self.path / name
            if path.exists():
                template = _read(path).get("chat_template")
                if isinstance(template, str):
                    return template
        raise LlavaOvError(f"{self.path} has no chat template (chat_template.jinja / chat_template.json)")

    @cached_property
    def special_tokens(self) -> dict[str, str]:
        """bos/eos/unk/pad token strings the template may use."""
        out: dict[str, Any] = {}
        for name in SPECIAL_TOKEN_FILES:
            path = self.path / name
            if path.exists():
                for key, value in _read(path).items():
                    if key.endswith("_token") and key not in out:
                        out[key] = value["content"] if isinstance(value, dict) else value
        return {k: v for k, v in out.items() if isinstance(v, str)}

    def describe(self) -> dict[str, Any]:
        """What the checkpoint is: its transformers class, vision tower and language model (config.json)."""
        vision, text = self.config.get("vision_config") or {}, self.text_config
        return {
            "architecture": (self.config.get("architectures") or [None])[0],
            "vision_tower": vision.get("model_type"),
            "image_size": vision.get("image_size"),
            "language_model": text.get("model_type"),
            "language_layers": text.get("num_hidden_layers"),
            "hidden_size": text.get("hidden_size"),
            "context": text.get("max_position_embeddings"),
        }

    def special_token_ids(self) -> dict[str, int]:
        """The tokenizer's special added tokens (tokenizer.json), text -> id."""
        added = (self.tokenizer_json or {}).get("added_tokens") or []
        return {t["content"]: int(t["id"]) for t in added if isinstance(t, dict) and t.get("special") and "content" in t}

    @cached_property
    def tokenizer_json_text(self) -> str | None:
        """tokenizer.json as text (None when absent)."""
        path = self.path / TOKENIZER_JSON
        return path.read_text(encoding="utf-8") if path.exists() else None

    @cached_property
    def tokenizer_json(self) -> dict[str, Any] | None:
        """tokenizer.json parsed (None when absent)."""
        text = self.tokenizer_json_text
        return json.loads(text) if text is not None else None

    @property
    def tokenizer_path(self) -> Path:
        return self.path / layout.TOKENIZER_MODEL

    @property
    def detokenizer_path(self) -> Path:
        return self.path / layout.DETOKENIZER_MODEL

    # ------------------------------------------------------------ parts

    def part_path(self, part: str) -> Path:
        """The IR of a part (vision, text_embeddings, language, or a family's projector/resampler) in this export."""
        return self.path / layout.ALL_PARTS[part]

    def part_info(self, part: str) -> dict[str, Any]:
        """export_info.json's record of one part ({} when unknown)."""
        return self.info.get("parts", {}).get(part, {})

    def stored_precision(self, part: str, default: str = "?") -> str:
        """How a part's weights are stored (fp16, int4_sym g64 r0.6 + int8, int8_ptq, ...)."""
        return str(self.part_info(part).get("precision", default))

    @property
    def vision_float_file(self) -> str | None:
        """The float vision encoder kept beside an INT8-PTQ one (its file name), when present."""
        name = self.part_info("vision").get("float_file")
        return name if name and (self.path / name).is_file() else None

    @property
    def vision_float_precision(self) -> str:
        return str(self.part_info("vision").get("float_precision", "?"))

    def rotary_in_fp16(self) -> bool:
        """Made by an older llava-ov that stored the language model's rotary frequencies in fp16."""
        entry = self.part_info("language")
        compressed_from = self.info.get("compression", {}).get("parts", {}).get("language", {}).get("from")
        made_from_fp16 = entry.get("precision") == "fp16" or compressed_from == "fp16"
        return made_from_fp16 and "rotary_frequencies" not in entry
