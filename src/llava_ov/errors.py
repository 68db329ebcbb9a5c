"""Errors users can act on: every front end prints these as one clear line."""

from __future__ import annotations


class LlavaOvError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class UnsupportedModelError(LlavaOvError):
    """The checkpoint is not a LLaVA family this project converts."""


class ExportExistsError(LlavaOvError):
    """The output directory exists and --overwrite was not given."""


class ModelNotFoundError(LlavaOvError):
    """A model directory or hub id that cannot be found or read."""


class InvalidImageError(LlavaOvError):
    """An image that is missing, corrupt, or too large to decode safely."""


class InvalidVideoError(LlavaOvError):
    """A video that is missing, corrupt, too large or too long to decode safely."""


class ContextLengthError(LlavaOvError):
    """A prompt (with its image tokens) longer than the model's context."""


class DiskFullError(LlavaOvError):
    """No space left while writing an export."""


class InvalidTextError(LlavaOvError):
    """Text that is not valid Unicode (e.g. a lone surrogate from a JSON escape)."""


def require_extra(module: str, extra: str, what: str):
    """Import `module`, or say which pip extra brings it (one line, no traceback)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise LlavaOvError(f"{what} needs the {extra} extra: pip install 'llava-ov[{extra}]' ({exc.name} missing)") from None
