"""OpenAI-compatible HTTP server for llava-ov (`llava-ov serve`).

Modules, one concern each: `settings` (options and limits), `schemas`
(request/response models), `errors` (OpenAI error bodies), `mapping` (requests
-> runtime messages and settings), `images` (image URLs: data, http(s) with
SSRF guards, local files), `worker` (admission into the pipeline's backend, one task per request),
`completions` (one request: JSON or SSE answer, disconnects, timeouts),
`guards` (API key and body-size middleware), `metrics` (Prometheus text),
`app` (routes and lifecycle) and `cli`.

The package's top level imports nothing heavy: FastAPI, uvicorn and httpx are
imported only by `app` and its modules, when the server actually runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "ServerSettings"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from llava_ov.frontends.server.app import create_app

        return create_app
    if name == "ServerSettings":
        from llava_ov.frontends.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'llava_ov.frontends.server' has no attribute {name!r}")
