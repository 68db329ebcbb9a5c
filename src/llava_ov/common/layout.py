"""Typed settings shared across stages: export layout, export_info.json, generation settings."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# File names follow optimum-intel's export so openvino_genai.VLMPipeline can load ours.
VISION_MODEL = "openvino_vision_embeddings_model.xml"
TEXT_EMBEDDINGS_MODEL = "openvino_text_embeddings_model.xml"
LANGUAGE_MODEL = "openvino_language_model.xml"
# Beside an INT8-PTQ vision encoder, the float one it was made from: the runtime picks per CPU (model.py).
VISION_FLOAT_MODEL = "openvino_vision_embeddings_model_float.xml"
TOKENIZER_MODEL = "openvino_tokenizer.xml"
DETOKENIZER_MODEL = "openvino_detokenizer.xml"
EXPORT_INFO = "export_info.json"
CHAT_TEMPLATE = "chat_template.jinja"
EXAMPLES_DIR = Path(__file__).resolve().parents[3] / "examples"  # the example photos of a source checkout

# The stateful language model's KV state tensors: [batch, kv heads, sequence, head dim].
KV_BATCH_AXIS = 0
KV_SEQ_AXIS = 2

MODEL_PARTS = {
    "vision": VISION_MODEL,
    "text_embeddings": TEXT_EMBEDDINGS_MODEL,
    "language": LANGUAGE_MODEL,
}
# Vision stages some families export as models of their own (optimum-intel's names, as openvino_genai
# loads them): "vision" is then the tower alone, and these run after it (families/*/runtime.py says which).
PROJECTOR_MODEL = "openvino_multi_modal_projector_model.xml"
RESAMPLER_MODEL = "openvino_vision_resampler_model.xml"
STAGE_PARTS = {"projector": PROJECTOR_MODEL, "resampler": RESAMPLER_MODEL}
ALL_PARTS = {**MODEL_PARTS, **STAGE_PARTS}


@dataclass
class ExportInfo:
    """What made an export: written as export_info.json beside the IRs."""

    source: str
    revision: str | None = None
    family: str = ""
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)  # part -> {"precision": ..., ...}
    compression: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. "random weights: answers are noise"

    def save(self, export_dir: Path) -> None:
        (Path(export_dir) / EXPORT_INFO).write_text(json.dumps(asdict(self), indent=2) + "\n")


def library_versions(packages=("llava-ov", "openvino", "openvino-tokenizers", "nncf", "torch", "transformers")):
    """Installed versions of `packages` (missing ones left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def looks_like_path(model: str) -> bool:
    """A MODEL argument meant as a local folder: ./x, /x, ~/x, a/b/c, or org/name whose org is a local folder."""
    if model.startswith((".", "/", "~")) or model.count("/") != 1 or os.sep in model.replace("/", ""):
        return True
    return Path(model).parent.is_dir()  # models/nodemo when models/ exists: a mistyped path, not a hub id
