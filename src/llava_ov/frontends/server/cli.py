"""`llava-ov serve MODEL`: run the OpenAI-compatible server (imports only the stdlib and llava_ov at import time)."""

from __future__ import annotations

import argparse
import logging

from llava_ov.frontends.args import add_image_token_args, add_model_args
from llava_ov.errors import LlavaOvError
from llava_ov.frontends.server.settings import MiB, ServerSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (0: any free port)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or set LLAVA_OV_API_KEY)")
    p.add_argument("--model-name", default="", help="model id reported to clients (default: the folder name)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests accepted beyond what the engine runs (--max-running); more get 429")
    p.add_argument("--max-tokens", type=int, default=1024, help="cap on max_tokens (and the default)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="refuse longer prompts (images counted from their sizes, before encoding; default: the context)")
    add_image_token_args(p)  # the defaults of requests that do not set max_image_tokens / visual_token_pruning
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="default of requests that do not set prompt_lookup: tokens proposed per step (0: off)")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest request body")
    p.add_argument("--max-image-mb", type=float, default=20, help="largest image (encoded)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="largest image (decoded pixels)")
    p.add_argument("--max-request-pixels", type=int, default=100_000_000,
                   help="all images of a request together (declared pixels, checked before any is decoded)")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-videos", type=int, default=2, help="videos per request (LLaVA-NeXT-Video models)")
    p.add_argument("--max-video-mb", type=float, default=64, help="largest video (encoded)")
    p.add_argument("--max-video-seconds", type=float, default=600, help="longest video (declared duration)")
    p.add_argument("--max-video-frames", type=int, default=9_000, help="most frames a video may declare")
    p.add_argument("--num-frames", type=int, default=None, metavar="N",
                   help="frames sampled from each video when a request does not say (default: the model's own)")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=600, help="seconds for queue wait + generation")
    p.add_argument("--fetch-timeout", type=float, default=10, help="seconds to download one image URL")
    p.add_argument("--allow-local-files", action="store_true", help="accept file:// URLs and server paths as images")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let image URLs reach loopback, private and link-local addresses")  # fmt: skip
    p.add_argument("--max-connections", type=int, default=10_000,
                   help="open sockets; past it the connection idle longest is closed to make room")
    p.add_argument("--max-requests", type=int, default=64,
                   help="requests in progress (bodies being read, queued, generating); more get 503 (/health never)")
    p.add_argument("--header-timeout", type=float, default=10, help="seconds for a request's headers to arrive")
    p.add_argument("--body-timeout", type=float, default=30, help="seconds for its body to arrive after them (408)")
    p.add_argument("--max-header-kb", type=float, default=64, help="largest request line + headers")
    p.add_argument("--keep-alive", type=float, default=5, help="seconds an idle keep-alive connection stays open")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def port_number(text: str) -> int:
    """argparse type: a TCP port (uvicorn would otherwise log one port and listen on another)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range (0-65535)")
    return value


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    import os

    from llava_ov.runtime.generate import GenerationConfig

    # request defaults that no request could use are refused now, not in every request's 400
    GenerationConfig(max_image_tokens=args.max_image_tokens, visual_token_pruning=args.visual_token_pruning,
                     num_frames=args.num_frames, prompt_lookup=args.prompt_lookup).validate()  # fmt: skip
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise LlavaOvError("--max-prompt-tokens must be >= 1")

    from llava_ov.runtime.settings import LoadSettings

    return ServerSettings(
        model=args.model, model_id=args.model_name, weight_format=args.weight_format,
        load=LoadSettings.from_args(args).validate(),
        api_key=args.api_key or os.environ.get("LLAVA_OV_API_KEY") or None,
        max_queue=args.max_queue, max_tokens=args.max_tokens, max_body_bytes=int(args.max_body_mb * MiB),
        max_image_bytes=int(args.max_image_mb * MiB), max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        max_images=args.max_images, request_timeout_s=args.request_timeout, fetch_timeout_s=args.fetch_timeout,
        allow_local_files=args.allow_local_files, allow_private_urls=args.allow_private_urls,
        max_connections=args.max_connections, max_requests=args.max_requests,
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
        max_header_bytes=int(args.max_header_kb * 1024), keep_alive_s=args.keep_alive,
        max_image_tokens=args.max_image_tokens, visual_token_pruning=args.visual_token_pruning,
        prompt_lookup=args.prompt_lookup,
        max_prompt_tokens=args.max_prompt_tokens, max_videos=args.max_videos,
        max_video_bytes=int(args.max_video_mb * MiB), max_video_seconds=args.max_video_seconds,
        max_video_frames=args.max_video_frames, num_frames=args.num_frames,
    )  # fmt: skip


def fit_connections_to_file_limit(settings: ServerSettings) -> ServerSettings:
    """`settings` with --max-connections lowered to what the process may open (said in the log)."""
    from dataclasses import replace

    from llava_ov.frontends.server.http import sockets_allowed

    allowed = sockets_allowed(settings.max_connections)
    if allowed < settings.max_connections:
        logging.getLogger("llava_ov.frontends.server").warning(
            "--max-connections %d is over what the open-file limit allows; using %d (raise it with ulimit -n)",
            settings.max_connections, allowed)  # fmt: skip
        return replace(settings, max_connections=allowed)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    """Start uvicorn; the model loads in the background (/health is 503 until it is ready)."""
    try:
        import uvicorn

        from llava_ov.frontends.server.app import create_app
    except ImportError as exc:
        hint = f"pip install 'llava-ov[serve]' ({exc.name} missing)"
        raise LlavaOvError(f"the server needs the serve extra: {hint}") from None
    settings = settings_from_args(args)
    for name, value in (("--max-queue", settings.max_queue), ("--max-tokens", settings.max_tokens),
                        ("--max-request-pixels", settings.max_request_pixels),
                        ("--max-connections", settings.max_connections),
                        ("--max-requests", settings.max_requests), ("--max-header-kb", settings.max_header_bytes),
                        ("--header-timeout", settings.header_timeout_s), ("--keep-alive", settings.keep_alive_s),
                        ("--body-timeout", settings.body_timeout_s)):  # fmt: skip
        if value <= 0:
            raise LlavaOvError(f"{name} must be > 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = fit_connections_to_file_limit(settings)
    failed = []

    def stop_on_failure() -> None:  # a server without its model is of no use: exit so a supervisor notices
        failed.append(True)
        server.should_exit = True

    app = create_app(settings, on_load_failure=stop_on_failure)  # the default loader: settings.load, all of it
    from llava_ov.frontends.server.http import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, settings, host=args.host, port=args.port, log_level=args.log_level))
    server.run()
    if failed:
        raise LlavaOvError("the model failed to load (see the log above)")
    return 0
