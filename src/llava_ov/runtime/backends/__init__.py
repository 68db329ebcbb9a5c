"""Backends: where a prepared prompt runs. One interface (`Backend`), two implementations.

`PagedBackend` submits to the paged `Engine` (many sequences batched, prefix-cached KV blocks);
`StatefulBackend` runs the export's stateful language model (the NPU path), one sequence at a
time in arrival order. Both take `submit(prompt, state, cancel) -> Handle`, and the handle is
read the same way (`for` or `async for`), so the Pipeline and the front ends never ask which one runs.
"""

from __future__ import annotations

from llava_ov.runtime.backends.base import Backend
from llava_ov.runtime.backends.paged import PagedBackend
from llava_ov.runtime.backends.stateful import StatefulBackend
from llava_ov.runtime.model import ExportedModel
from llava_ov.runtime.settings import LoadSettings

__all__ = ["Backend", "PagedBackend", "StatefulBackend", "backend_for"]


def backend_for(model: ExportedModel, settings: LoadSettings | None = None) -> Backend:
    """The paged engine when the model was loaded with a paged KV cache, else the stateful backend."""
    if model.paged is not None:
        return PagedBackend(model, settings)
    return StatefulBackend(model)
