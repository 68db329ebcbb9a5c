"""`llava-ov` command line: thin subcommands over the Python API.

Each front end (ui, serve, bench, batch, compress, evaluate) registers its own
subcommand through a `register(subparsers)` function in its module, listed in
`FRONT_ENDS`; this file holds only the core commands.  Errors users can act on
(`LlavaOvError`) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from llava_ov.errors import LlavaOvError
from llava_ov.frontends.args import add_generation_args, add_model_args, generation_config, load_pipeline, warn_token_cap
from llava_ov.runtime.settings import LoadSettings

# Modules that add subcommands: module path -> its register function.
FRONT_ENDS = ("llava_ov.frontends.compress", "llava_ov.frontends.ui", "llava_ov.frontends.server.cli", "llava_ov.tools.bench", "llava_ov.frontends.batch.command")


# ---------------------------------------------------------------- commands


def cmd_convert(args: argparse.Namespace) -> int:
    from llava_ov.exporting.convert import ConvertOptions, convert

    quant = None
    if args.weight_format in ("int4", "int8"):
        from llava_ov.exporting.quantize import QuantConfig

        quant = QuantConfig(group_size=args.group_size, ratio=args.ratio)
    opts = ConvertOptions(weight_format=args.weight_format, overwrite=args.overwrite, revision=args.revision, quant=quant,
                          check_resources=args.check_resources)  # fmt: skip
    out = convert(args.src, Path(args.output), opts)
    print(f"exported {args.src} to {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Exit status 0; 1 when a --json-schema answer was cut before its JSON ended."""
    config = generation_config(args)  # a bad schema file fails before the model loads
    pipe = load_pipeline(args)
    images = [args.image] if args.image else []
    videos = list(args.video)
    warn_token_cap(pipe, config)
    if args.json:
        result = pipe.generate(args.prompt, images, config, videos=videos)
        print(json.dumps(result.as_dict(), ensure_ascii=False))
        return 0
    result = None
    shown = False

    def progress(done: int, total: int) -> None:
        nonlocal shown
        shown = True
        print(f"\r[prefill {done:,}/{total:,} tokens]", end="", file=sys.stderr, flush=True)

    live = args.verbose and sys.stderr.isatty()  # a redrawn progress line only on a terminal, not in a file or pipe
    for chunk in pipe.stream(args.prompt, images, config, progress=progress if live else None, videos=videos):
        if shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
            shown = False
        print(chunk.text, end="", flush=True)
        result = chunk.result or result
    print()
    if result is not None and args.verbose:
        t = result.timings
        print(f"[{result.finish_reason}; {result.prompt_tokens} prompt tokens ({result.image_token_note()}); "
              f"TTFT {t.ttft_s:.2f} s; {t.tokens_per_s:.1f} tokens/s]", file=sys.stderr)  # fmt: skip
    if result is not None and config.json_schema is not None:
        from llava_ov.runtime.constrained import parse_answer

        _, problem = parse_answer(result.text, result.finish_reason, len(result.token_ids))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from llava_ov.frontends.terminal import run_terminal_chat

    pipe, config = load_pipeline(args), generation_config(args)
    warn_token_cap(pipe, config)
    return run_terminal_chat(pipe, config, system=args.system)


def cmd_demo_model(args: argparse.Namespace) -> int:
    from llava_ov.exporting.demo import build_demo_model

    out = build_demo_model(Path(args.output), family=args.family, overwrite=args.overwrite)
    print(f"demo model ready at {out}\nnote: it has RANDOM weights; its answers are noise (for trying the tools offline)")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Fetch a model into the cache: a hub export as it is (no torch), else converted (needs the convert extra)."""
    from llava_ov.exporting.hub import resolve_model

    print(resolve_model(args.model, weight_format=args.weight_format))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the models cache (hub ids and checkpoints converted on first use), or remove one."""
    from llava_ov.exporting.hub import cached_models, models_cache_dir, remove_cached

    if args.action == "rm":
        if not args.name:
            raise LlavaOvError("models rm takes the NAME of a cached model (see `llava-ov models`)")
        removed = remove_cached(args.name)
        print(f"removed {removed.name} ({removed.size_bytes / 1e9:.2f} GB)")
        return 0
    models = cached_models()
    if args.json:
        rows = [{**vars(m), "path": str(m.path)} for m in models]
        print(json.dumps({"cache": str(models_cache_dir()), "models": rows}, indent=2))
        return 0
    print(f"{models_cache_dir()}: {len(models)} model(s)")
    for m in models:
        state = "" if m.complete else "  (incomplete: an interrupted conversion; `models rm` it)"
        print(f"{m.name}  {m.size_bytes / 1e9:.2f} GB  {m.family or '?'} {m.weight_format}  from {m.source or '?'}  "
              f"{m.created[:10]}{state}")  # fmt: skip
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from llava_ov.runtime.pipeline import Pipeline

    pipe = Pipeline(args.model, LoadSettings.from_args(args))
    print(json.dumps(pipe.info(), indent=2))
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-ov", description="LLaVA visual assistants on OpenVINO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face LLaVA checkpoint to OpenVINO")
    p.add_argument("src", help="hub id (e.g. llava-hf/llava-v1.6-mistral-7b-hf) or local checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="export directory to create")
    p.add_argument("--weight-format", default="fp16", choices=["fp32", "fp16", "int8", "int4"])
    p.add_argument("--group-size", type=int, default=64, help="INT4 group size")
    p.add_argument("--ratio", type=float, default=0.6, help="share of INT4 weights (rest INT8)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--skip-resource-check", dest="check_resources", action="store_false",
                   help="convert even where the memory/disk estimate says it will not fit")  # fmt: skip
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("run", help="answer one prompt about an image or a video (streams the answer)")
    add_model_args(p)
    p.add_argument("--image", help="image file")
    p.add_argument("--video", action="append", default=[], metavar="FILE",
                   help="video file (repeatable; LLaVA-NeXT-Video models): --num-frames frames sampled uniformly")  # fmt: skip
    p.add_argument("--prompt", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, finish_reason, timings")
    p.add_argument("-v", "--verbose", action="store_true", help="print finish reason and speed")
    add_generation_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive terminal chat (/image PATH, /video PATH, /reset, /exit)")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_generation_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo-model", help="build a small RANDOM-weight model to try the tools offline")
    p.add_argument("output")
    p.add_argument("--family", default="llava-next", choices=["llava-next", "llava", "llava-next-video", "llava-onevision"],
                   help="llava-next-video, llava-onevision: models that also take videos (--video, /video)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo_model)

    p = sub.add_parser("pull", help="fetch a hub model into the cache: its OpenVINO export, else a conversion")
    p.add_argument("model", help="hub id (e.g. llava-hf/llava-v1.6-mistral-7b-hf) or checkpoint directory")
    p.add_argument("--weight-format", default="int4", choices=["fp16", "int8", "int4"],
                   help="when the repository holds a checkpoint: the converted export's weights")  # fmt: skip
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list the models pulled or converted into the cache, or remove one")
    p.add_argument("action", nargs="?", choices=["list", "rm"], default="list")
    p.add_argument("name", nargs="?", help="with rm: the cached model's name, as `llava-ov models` lists it")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="show what an export holds and how it runs")
    p.add_argument("model", help="export directory")
    LoadSettings.add_arguments(p)  # how it would run with these settings
    p.set_defaults(func=cmd_info)

    for name in FRONT_ENDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # that front end is not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LlavaOvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
