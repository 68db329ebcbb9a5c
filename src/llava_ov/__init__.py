"""llava-ov: LLaVA visual-language assistants on OpenVINO.

The public API is imported lazily so that `import llava_ov` stays cheap and
never pulls torch or transformers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Pipeline": "llava_ov.runtime.pipeline",
    "Message": "llava_ov.runtime.pipeline",
    "GenerationResult": "llava_ov.runtime.pipeline",
    "ChatSession": "llava_ov.runtime.chat",
    "GenerationConfig": "llava_ov.runtime.generate",
    "LoadSettings": "llava_ov.runtime.settings",
    "convert": "llava_ov.exporting.convert",
    "LlavaOvError": "llava_ov.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llava_ov' has no attribute {name!r}")
