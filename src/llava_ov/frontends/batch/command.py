"""`llava-ov batch`: flags, and the run on one machine (rows in flight) or on Ray."""

from __future__ import annotations

import argparse
import sys

from llava_ov.errors import LlavaOvError, require_extra
from llava_ov.frontends.batch.files import DEFAULT_PROMPT
from llava_ov.frontends.batch.local import FetchOptions, PipelineSpec, run_batch


def register(subparsers) -> None:
    """Add `llava-ov batch`."""
    from llava_ov.frontends.args import add_generation_args, add_model_args

    p = subparsers.add_parser(
        "batch", help="caption a folder or table of images or videos into JSONL/Parquet (resumable; --in-flight, --ray)"
    )
    add_model_args(p)
    p.add_argument("input", help="folder of images (recursive), or a .csv/.jsonl/.parquet table of image paths/URLs")
    p.add_argument("-o", "--output", required=True, help="results: .jsonl or .parquet (with --ray: a directory)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for rows without their own (default: %(default)r)")
    p.add_argument("--image-column", default=None, help="table column with the image path or URL (default: image)")
    p.add_argument("--video-column", default=None,
                   help="table column with a video path or URL (default: video, if any; LLaVA-NeXT-Video models)")
    p.add_argument("--prompt-column", default=None, help="table column with a per-row prompt (default: prompt, if any)")
    p.add_argument("--id-column", default=None, help="table column with a unique row id (default: id, else row index)")
    p.add_argument("--in-flight", type=int, default=4,
                   help="rows in the engine at once (one process, one model; they decode together)")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="with --ray: actors, each loads the model")
    p.add_argument("--threads", type=int, default=None, help="with --ray: OpenVINO threads per actor")
    p.add_argument("--retry-errors", action="store_true", help="run again the rows recorded with an error")
    p.add_argument("--allow-private-urls", action="store_true", help="let image URLs reach private/loopback hosts")
    p.add_argument("--url-timeout", type=float, default=20.0, help="seconds allowed to fetch one image URL")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ray", action="store_true", help="run on Ray Data (a local instance unless --ray-address)")
    p.add_argument("--ray-address", default=None, help="address of an existing Ray cluster (implies --ray)")
    add_generation_args(p)
    p.set_defaults(func=cmd_batch)


def pipeline_spec(args: argparse.Namespace) -> PipelineSpec:
    """What `args.load_pipeline(args)` would load, as a spec other processes can load."""
    from llava_ov.exporting.hub import resolve_model
    from llava_ov.runtime.settings import LoadSettings

    settings = LoadSettings.from_args(args).validate()  # a bad value fails before a hub id is converted
    return PipelineSpec(str(resolve_model(args.model, weight_format=args.weight_format)), settings)


def cmd_batch(args: argparse.Namespace) -> int:
    """Exit status: 0 every row answered, 1 some rows have errors, 130 interrupted (see BatchSummary.exit_code)."""
    from llava_ov.frontends.args import generation_config

    if args.ray or args.ray_address:
        require_extra("ray", "batch", "--ray")
    parquet = [x for x in (args.input, args.output) if str(x).endswith(".parquet")]
    if parquet or args.ray or args.ray_address:
        require_extra("pyarrow", "batch", "Parquet input/output" if parquet else "--ray")
    spec = pipeline_spec(args)
    common = dict(
        prompt=args.prompt, config=generation_config(args),
        columns={"image": args.image_column, "prompt": args.prompt_column, "id": args.id_column,
                 "video": args.video_column},
        fetch=FetchOptions(fetch_timeout_s=args.url_timeout, allow_private_urls=args.allow_private_urls),
        retry_errors=args.retry_errors,
    )  # fmt: skip
    if args.ray or args.ray_address:
        from llava_ov.frontends.batch.on_ray import run_ray_batch

        summary = run_ray_batch(spec, args.input, args.output, address=args.ray_address, workers=args.workers,
                                threads=args.threads, **common)  # fmt: skip
    else:
        if args.workers != 1 or args.threads is not None:
            raise LlavaOvError("--workers and --threads are for --ray; on one machine use --in-flight N")
        summary = run_batch(spec, args.input, args.output, progress=not args.no_progress, in_flight=args.in_flight,
                            **common)  # fmt: skip
    print(summary.line(), file=sys.stderr)
    return summary.exit_code
