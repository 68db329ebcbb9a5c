"""The model families the runtime can run: an interface and a lazy registry by architecture.

Everything specific to a family (which config fields mean what, preprocessing,
feature packing, image-token budget rules, conversion) lives in its folder,
`llava_ov/families/<name>/`: `runtime.py` (torch-free, defines `FAMILY`) and
`export.py` (conversion hooks, torch imported lazily, defines `EXPORT`). The
registry names those modules by string and imports them on first use (vLLM's
pattern), so the runtime depends on the `Family` interface only.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from llava_ov.errors import LlavaOvError, UnsupportedModelError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from llava_ov.runtime.budget import Resolution
    from llava_ov.runtime.export import ExportDir
    from llava_ov.runtime.image import ProcessedImage


# Runs one vision stage ("vision", "projector", "resampler") on an array: the model gives it to a family.
RunStage = Callable[[str, "np.ndarray"], "np.ndarray"]


class Family(Protocol):
    """What the runtime asks of a model family, bound to one export's config and image settings."""

    model_type: str
    architecture: str
    tokens_per_tile: int  # image tokens of one vision tile
    image_token_id: int  # the prompt's <image> placeholder id
    stages: tuple[str, ...]  # vision stages beside "vision" the export holds (common.layout.STAGE_PARTS)
    takes_video: bool
    video_token_id: int | None  # the prompt's <video> placeholder id (None: no video)
    tokens_per_frame: int  # video tokens of one frame
    default_frames: int  # frames sampled from a video when the request does not say

    def encode_tiles(self, run: RunStage, pixel_values: np.ndarray) -> np.ndarray:
        """[tiles, 3, H, W] -> [tiles, tokens_per_tile, hidden] projected features."""

    def preprocess_frames(self, frames: Sequence[Image.Image]) -> np.ndarray:
        """RGB frames -> [frames, 3, H, W] model-ready pixels (the video processor's per-frame steps)."""

    def encode_frames(self, run: RunStage, pixel_values: np.ndarray) -> np.ndarray:
        """[frames, 3, H, W] -> [frames, tokens_per_frame, hidden] video features."""

    def video_tiles(self, frames: int) -> np.ndarray:
        """Per packed video position: its frame, or -1 for a separator; its length is the video's tokens."""

    def pack_frames(self, frame_features: Sequence[np.ndarray]) -> np.ndarray:
        """The frames' encoded features (in order) -> the video's [N, C] prompt tokens."""

    def resolutions(self, image_size: tuple[int, int], images_in_prompt: int = 1) -> list[Resolution]:
        """Every way to feed an image of (height, width), most tokens first (the first: the model's own);
        `images_in_prompt`: how many images the whole prompt holds (some families feed several differently)."""

    def preprocess(self, image: Image.Image, resolution: Resolution) -> ProcessedImage:
        """Model-ready pixel tiles of an RGB image at one of its resolutions."""

    def pack(self, tile_features: np.ndarray, processed: ProcessedImage) -> np.ndarray:
        """[tiles, tokens_per_tile, C] vision features -> [N, C] image tokens of the prompt."""

    def packed_tiles(self, image_size: tuple[int, int], resolution: Resolution) -> np.ndarray:
        """Per packed token (before encoding): its tile (0 = base image), or -1 for a separator token."""


def no_video(architecture: str) -> LlavaOvError:
    """The error a video meets where the model takes none."""
    return LlavaOvError(f"{architecture} takes no video (LLaVA-NeXT-Video and LLaVA-OneVision models do); send frames as images")


@dataclass(frozen=True)
class FamilyEntry:
    """One registered family: its names and the package holding its modules."""

    model_type: str  # config.json "model_type"
    architecture: str  # config.json "architectures"[0]; the transformers class
    package: str  # e.g. "llava_ov.families.llava_next"

    def runtime_module(self) -> Any:
        return importlib.import_module(f"{self.package}.runtime")

    def load(self, config: dict[str, Any], image: Any, video: Any = None) -> Family:
        """The family bound to one export's config.json and image (and video) settings (export.ImageConfig)."""
        return self.runtime_module().FAMILY(config, image, video)

    def export_hooks(self) -> Any:
        """The family's conversion hooks (imports its export module, which may use torch)."""
        return importlib.import_module(f"{self.package}.export").EXPORT


FAMILIES_PACKAGE = "llava_ov.families"


@lru_cache(maxsize=1)
def registered() -> dict[str, FamilyEntry]:
    """Every family folder of FAMILIES_PACKAGE, by architecture: a folder's `__init__.py` names its
    MODEL_TYPE and ARCHITECTURES (and imports nothing), so adding a family is adding a folder."""
    package = importlib.import_module(FAMILIES_PACKAGE)
    entries: dict[str, FamilyEntry] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        name = f"{FAMILIES_PACKAGE}.{info.name}"
        folder = importlib.import_module(name)
        for architecture in folder.ARCHITECTURES:
            entries[architecture] = FamilyEntry(folder.MODEL_TYPE, architecture, name)
    return entries


def supported_architectures() -> str:
    return ", ".join(registered())


def load_family(export: ExportDir) -> Family:
    """The family of an export, bound to its config.json and image settings."""
    return family_for(export.config).load(export.config, export.image_config, export.video_config)


def family_for(config: dict[str, Any]) -> FamilyEntry:
    """The family of a config.json dict: by architecture, else (no architectures given) by model_type."""
    archs = config.get("architectures") or []
    if archs:
        entry = registered().get(archs[0])
    else:
        entry = next((e for e in registered().values() if e.model_type == config.get("model_type")), None)
    if entry is None:
        found = archs[0] if archs else f"model_type={config.get('model_type')!r}"
        raise UnsupportedModelError(f"{found} is not supported; supported architectures: {supported_architectures()}")
    return entry
