"""The FastAPI app: routes, error handlers, model loading and the generation worker's lifecycle.

`create_app(settings, pipeline_factory)` builds one server for one model.  The
model loads in a background thread once the server is up: `/health` answers
503 until it is ready, then 200.  Every error is an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from llava_ov import __version__
from llava_ov.runtime.constrained import InvalidGrammarError
from llava_ov.errors import LlavaOvError
from llava_ov.frontends.server.completions import Completion, EventStream
from llava_ov.frontends.server.errors import APIError, error_body
from llava_ov.frontends.server.guards import APIKeyGuard, BodyLimit, RequestLimit
from llava_ov.frontends.server.images import ImageLoader, ImagePolicy
from llava_ov.frontends.server.videos import VideoLoader, VideoPolicy
from llava_ov.frontends.server.jsonparse import OFFLOAD_BYTES, TooDeep, TooManyValues, exit_with_parent, parse_limited
from llava_ov.frontends.server.mapping import generation_config, offered_tools, schema_error, to_messages
from llava_ov.frontends.server.metrics import MetricsMiddleware, ServerMetrics
from llava_ov.frontends.server import responses
from llava_ov.frontends.server.responses import ResponseBuilder, ResponsesRequest, to_chat
from llava_ov.frontends.server.schemas import ChatCompletion, ChatCompletionRequest, ErrorResponse, Health, ModelList
from llava_ov.frontends.server.settings import ServerSettings
from llava_ov.frontends.server.worker import GenerationWorker, Job, QueueFull

log = logging.getLogger("llava_ov.frontends.server")
PATHS = {"/v1/chat/completions", "/v1/responses", "/v1/models", "/health", "/metrics", "/openapi.json", "/docs"}
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 429, 500, 503)}


class BodyParser:
    """Request bodies as JSON: small ones inline, large ones in a child process (jsonparse.py says why)."""

    def __init__(self) -> None:
        self._pool = None
        self._lock = threading.Lock()

    async def parse(self, body: bytes) -> Any:
        if len(body) <= OFFLOAD_BYTES:
            return parse_limited(body)
        return await asyncio.get_running_loop().run_in_executor(self._executor(), parse_limited, body)

    def _executor(self):
        with self._lock:
            if self._pool is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                self._pool = ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent
                )
            return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class JSONOffLoopRoute(APIRoute):
    """Parses a JSON body off the event loop (a large body never stalls /health or other clients);
    FastAPI then validates the parsed value (Request.json() returns it)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Any:
            body = await request.body()
            if body:
                try:
                    request._json = await request.app.state.server.parser.parse(body)
                except (TooManyValues, TooDeep) as e:
                    raise APIError(400, str(e), param="messages", code="request_too_complex") from None
                except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
                    pos, why = (e.pos, e.msg) if isinstance(e, json.JSONDecodeError) else (0, "not UTF-8 text")
                    detail = {"type": "json_invalid", "loc": ("body", pos), "msg": "JSON decode error",
                              "input": {}, "ctx": {"error": why}}  # fmt: skip
                    raise RequestValidationError([detail]) from None
            return await handler(request)

        return route


def load_pipeline(settings: ServerSettings) -> Any:
    """The default factory: resolve MODEL (converting a hub id once) and load it with every load setting."""
    from llava_ov.exporting.hub import resolve_model
    from llava_ov.runtime.pipeline import Pipeline

    settings.load.validate()  # before a hub id is converted
    pipeline = Pipeline(resolve_model(settings.model, weight_format=settings.weight_format), settings.load)
    for warning in pipeline.warnings():
        log.warning("%s", warning)
    return pipeline


class ServerState:
    """The model, its worker and the metrics of one app."""

    def __init__(self, settings: ServerSettings, factory: Callable[[], Any], on_load_failure: Callable[[], None]):
        self.settings = settings
        self.factory = factory
        self.on_load_failure = on_load_failure
        self.status = "loading"  # -> "ok" | "failed"
        self.created = int(time.time())
        self.metrics = ServerMetrics(
            queue_depth=lambda: self.worker.depth, running=lambda: self.worker.running,
            ready=lambda: float(self.status == "ok"), engine=lambda: self.worker.engine_stats(),
        )  # fmt: skip
        self.worker = GenerationWorker(settings.max_queue, self.metrics, settings.max_prompt_tokens)
        policy = ImagePolicy(
            max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
            allow_local_files=settings.allow_local_files, allow_private_urls=settings.allow_private_urls,
            fetch_timeout_s=settings.fetch_timeout_s, max_redirects=settings.max_redirects,
        )  # fmt: skip
        self.images = ImageLoader(policy)
        self.videos = VideoLoader(VideoPolicy(
            max_bytes=settings.max_video_bytes, limits=settings.video_limits(),
            allow_local_files=settings.allow_local_files, allow_private_urls=settings.allow_private_urls,
            fetch_timeout_s=settings.fetch_timeout_s, max_redirects=settings.max_redirects,
        ))  # fmt: skip
        self.parser = BodyParser()
        self._closing = threading.Event()

    def load(self) -> None:
        """Load the model (background thread), then start the worker."""
        try:
            pipeline = self.factory()
        except Exception as exc:
            if isinstance(exc, LlavaOvError):
                log.error("loading the model failed: %s", exc)
            else:
                log.exception("loading the model failed")
            self.status = "failed"
            self.on_load_failure()
            return
        pipeline.prompts.video_limits = self.settings.video_limits()  # what the loader let through, the run takes
        if not self._closing.is_set():
            self.worker.start(pipeline)
            self.status = "ok"
            log.info("model ready: %s", self.served_name)

    @property
    def served_name(self) -> str:
        """The model id clients see: --model-id, else the loaded export's name (its hub id, else its folder)."""
        pipeline = self.worker.pipeline
        if self.settings.model_id or pipeline is None:
            return self.settings.served_name
        return pipeline.model.export.name

    def require_ready(self) -> None:
        if self.status == "loading":
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading")
        if self.status == "failed":
            raise APIError(503, "the model failed to load (see the server log)", code="model_failed")

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        threading.Thread(target=self.load, name="llava-ov-load", daemon=True).start()
        yield
        self._closing.set()
        await self.worker.stop()
        self.parser.close()


def create_app(
    settings: ServerSettings,
    pipeline_factory: Callable[[], Any] | None = None,
    on_load_failure: Callable[[], None] = lambda: None,
) -> FastAPI:
    """An OpenAI-compatible app; `pipeline_factory` (default: load `settings.model`) runs in a background thread.

    `on_load_failure` is called if loading fails (the CLI stops the server then; an embedding app may keep
    answering 503 `model_failed`)."""
    state = ServerState(settings, pipeline_factory or (lambda: load_pipeline(settings)), on_load_failure)
    # /docs and /openapi.json are documented routes; /redoc is closed (it only duplicates /docs)
    app = FastAPI(title="llava-ov", version=__version__, lifespan=state.lifespan, redoc_url=None,
                  description="OpenAI-compatible chat completions with images, served by llava-ov.")  # fmt: skip
    app.router.route_class = JSONOffLoopRoute
    app.state.server = state
    _add_routes(app, state)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestLimit, max_requests=settings.max_requests)  # before a body is read
    app.add_middleware(APIKeyGuard, api_key=settings.api_key)  # before the body is read
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, paths=lambda: PATHS)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    settings = state.settings
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
             "description": "one Server-Sent Event: a chat.completion.chunk as JSON, the last one [DONE]"}  # fmt: skip
    stream_doc = {"text/event-stream": {"schema": event}}

    async def start(body: ChatCompletionRequest, request: Request, include_usage: bool) -> tuple[Completion, Any]:
        """Check, queue and start one request; its completion and first chunk (or the HTTP error)."""
        state.require_ready()
        native_tools = state.worker.pipeline.template_renders_tools
        config = generation_config(body, settings, native_tools)
        if state.worker.depth >= settings.max_queue:  # fail fast, before fetching and decoding images
            raise queue_full()
        calls_tools = bool(offered_tools(body)[0])
        if config.constraint_spec is not None:  # a grammar that cannot be compiled is refused before images are fetched
            param = "tools" if calls_tools else "response_format"
            await asyncio.to_thread(_check_grammar_compiles, state.worker.pipeline, config, param)
        takes_video = state.worker.pipeline.model.family.takes_video
        messages = await to_messages(body, settings, state.images, state.videos, takes_video, native_tools)
        job = Job(messages, config, n=body.n or 1, calls_tools=calls_tools)
        try:
            state.worker.submit(job)
        except QueueFull:
            raise queue_full() from None
        completion = Completion(
            job, request.receive, settings.request_timeout_s, state.served_name, include_usage,
            token_bytes=state.worker.pipeline.token_bytes,
        )  # fmt: skip
        return completion, await completion.first()

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={200: {"content": stream_doc}, **ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """Answer a conversation (text and images); `stream: true` sends Server-Sent Events."""
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        completion, first = await start(body, request, include_usage)
        if body.stream:
            return EventStream(completion.events(first))
        return await completion.collect(first)

    @app.post("/v1/responses", responses={200: {"content": stream_doc}, **ERRORS})
    async def create_response(body: ResponsesRequest, request: Request) -> Any:
        """OpenAI's Responses API, stateless: the whole conversation in `input`; `stream: true` sends its events."""
        builder = ResponseBuilder(body, state.served_name)
        completion, first = await start(to_chat(body), request, False)
        if body.stream:
            return EventStream(responses.events(completion, first, builder))
        return await responses.collect(completion, first, builder)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> dict[str, Any]:
        """The one model this server serves."""
        card = {"id": state.served_name, "object": "model", "created": state.created, "owned_by": "llava-ov"}
        return {"object": "list", "data": [card]}

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> JSONResponse:
        """200 once the model is loaded; 503 while it loads (or if loading failed)."""
        return JSONResponse({"status": state.status}, status_code=200 if state.status == "ok" else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text exposition."""
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _check_grammar_compiles(pipeline: Any, config: Any, param: str) -> None:
    try:
        pipeline.constraint(config)
    except InvalidGrammarError as exc:
        raise schema_error(exc, param) from None


def queue_full() -> APIError:
    return APIError(429, "the server is busy (request queue full); retry later", code="queue_full")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc.errors())
        return JSONResponse(error_body(400, message, param=param, code="invalid_request"), status_code=400)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return JSONResponse(error_body(500, "internal server error (see the server log)"), status_code=500)


def _describe_validation(errors: Any) -> tuple[str, str | None]:
    """One line for the first schema error, and the parameter it concerns (no input values echoed)."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}{more}", param
