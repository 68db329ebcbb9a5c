"""Supported model families as data.

A family says which transformers class loads it, how its images are
preprocessed and whether its image features are packed (unpad + image_newline).
Adding a family means adding an entry here (and, if it preprocesses differently,
one small function in image.py), never `if model_type == ...` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_ov.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json "model_type"
    architecture: str  # transformers class
    preprocessing: str  # key into image.PREPROCESSORS: "anyres" | "clip"
    packs_features: bool  # LLaVA-NeXT: unpad tiles + image_newline


FAMILIES: dict[str, Family] = {
    "llava_next": Family("llava_next", "LlavaNextForConditionalGeneration", "anyres", True),
    "llava": Family("llava", "LlavaForConditionalGeneration", "clip", False),
}


def supported_architectures() -> str:
    return ", ".join(f.architecture for f in FAMILIES.values())


def family_for(config: dict) -> Family:
    """The family of a config.json dict; a clear error for anything else."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    family = FAMILIES.get(model_type)
    if family is None:
        found = archs[0] if archs else f"model_type={model_type!r}"
        raise UnsupportedModelError(f"{found} is not supported; supported architectures: {supported_architectures()}")
    return family
