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

from .errors import LlavaOvError

# Modules that add subcommands: module path -> its register function.
FRONT_ENDS = ("llava_ov.quantize_cli", "llava_ov.ui", "llava_ov.server.cli", "llava_ov.bench", "llava_ov.batch")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="answer with JSON valid under this JSON Schema (constrained decoding)")  # fmt: skip
    add_image_token_args(p)


def add_image_token_args(p: argparse.ArgumentParser) -> None:
    """Fewer image tokens for a faster first token (docs/speed.md)."""
    p.add_argument("--max-image-tokens", type=int, default=None, metavar="N",
                   help="image tokens per request at most: each image at the largest resolution of the model's "
                        "own grid list that fits, down to the base tile (default: no limit)")  # fmt: skip
    p.add_argument("--visual-token-pruning", type=float, default=0.0, metavar="RATIO",
                   help="drop this share (0-0.99) of each image's tokens, chosen for the question by CDPruner "
                        "(default 0: off)")  # fmt: skip


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="export directory, or a Hugging Face hub id (converted on first use)")
    p.add_argument("--device", default="CPU", help="CPU, GPU, NPU or AUTO")
    p.add_argument("--weight-format", default="int4", help="for a hub id converted on first use (default int4)")
    p.add_argument("--f32", action="store_true", help="pin f32 inference and KV cache (reference numerics)")
    p.add_argument("--part-model", action="append", default=[], metavar="PART=PATH",
                   help="use another IR (or export dir) for one part: vision, text_embeddings or language; "
                        "e.g. language=exports/int4 to mix precisions")  # fmt: skip
    p.add_argument("--part-device", action="append", default=[], metavar="PART=DEVICE",
                   help="run one part on another device, e.g. vision=GPU")  # fmt: skip
    p.add_argument("--vision-encoder", default="auto", choices=["auto", "int8", "float"],
                   help="with an INT8-PTQ export: auto runs it where the CPU has int8 units (AMX, VNNI), "
                        "else the float encoder kept beside it (`llava-ov info` says which and why)")  # fmt: skip
    add_engine_args(p)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    from .engine import EngineConfig

    d = EngineConfig()
    g = p.add_argument_group("engine (paged KV cache, continuous batching)")
    g.add_argument("--kv-cache", default="auto", choices=["auto", "paged", "stateful"],
                   help="paged: many sequences share a KV block pool (default; auto picks stateful on NPU); "
                        "stateful: the export's own cache, one sequence at a time")  # fmt: skip
    g.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV block pool size (default: min(4 GiB, a quarter of free memory))")  # fmt: skip
    g.add_argument("--max-step-tokens", type=int, default=d.max_step_tokens,
                   help="tokens per forward: decode tokens plus prefill chunks")  # fmt: skip
    g.add_argument("--max-running", type=int, default=d.max_running, help="sequences decoding at once")
    g.add_argument("--decode-precision", default="auto", choices=["auto", "same", "f32"],
                   help="f32: decode steps run on a second f32 compilation of the language model; on CPUs "
                        "that compute bf16 by default, INT4 weights then decode ~1.35x faster while "
                        "prompts still prefill at bf16, for a second copy of the LM weights in memory; auto "
                        "(default): f32 where that holds and memory allows (`llava-ov info` says which)")  # fmt: skip


def parse_parts(pairs: list[str], what: str) -> dict[str, str]:
    """PART=VALUE options into a dict, with a clear error for anything else."""
    from .config import MODEL_PARTS

    out = {}
    for pair in pairs:
        part, sep, value = pair.partition("=")
        if not sep or part not in MODEL_PARTS or not value:
            raise LlavaOvError(f"--part-{what} expects PART={what.upper()} with PART one of {', '.join(MODEL_PARTS)}")
        out[part] = value
    return out


def generation_config(args: argparse.Namespace):
    from .constrained import load_schema
    from .generate import GenerationConfig

    schema = getattr(args, "json_schema", None)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=list(args.stop),
        json_schema=load_schema(schema) if schema else None,
        max_image_tokens=getattr(args, "max_image_tokens", None),
        visual_token_pruning=getattr(args, "visual_token_pruning", 0.0),
    )  # fmt: skip
    config.validate()  # before the model loads
    return config


def engine_config(args: argparse.Namespace):
    from .engine import EngineConfig

    d = EngineConfig()
    return EngineConfig(
        kv_cache_gb=getattr(args, "kv_cache_gb", None),
        max_step_tokens=getattr(args, "max_step_tokens", d.max_step_tokens),
        max_running=getattr(args, "max_running", d.max_running),
    )


def pipeline_options(args: argparse.Namespace) -> dict:
    """Pipeline keyword arguments from the model options (MODEL resolved, converted if needed)."""
    from .hub import resolve_model
    from .model import F32_PROPERTIES

    return dict(
        model_dir=str(resolve_model(args.model, weight_format=args.weight_format)), device=args.device,
        properties=dict(F32_PROPERTIES) if args.f32 else {},
        part_paths=parse_parts(getattr(args, "part_model", []), "model"),
        devices=parse_parts(getattr(args, "part_device", []), "device"),
        kv_cache=getattr(args, "kv_cache", "auto"), engine=engine_config(args),
        vision_encoder=getattr(args, "vision_encoder", "auto"),
        decode_precision=getattr(args, "decode_precision", "auto"),
    )  # fmt: skip


def load_pipeline(args: argparse.Namespace):
    from .pipeline import Pipeline

    pipe = Pipeline(**pipeline_options(args))
    for warning in pipe.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    return pipe


# ---------------------------------------------------------------- commands


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import ConvertOptions, convert

    quant = None
    if args.weight_format in ("int4", "int8"):
        from .quantize import QuantConfig

        quant = QuantConfig(group_size=args.group_size, ratio=args.ratio)
    opts = ConvertOptions(weight_format=args.weight_format, overwrite=args.overwrite, revision=args.revision, quant=quant,
                          check_resources=args.check_resources)  # fmt: skip
    out = convert(args.src, Path(args.output), opts)
    print(f"exported {args.src} to {out}")
    return 0


def warn_token_cap(pipe, config) -> None:
    """Say so when --max-new-tokens cannot be reached: answers stop at the context."""
    limit = pipe.model.max_context
    if config.max_new_tokens >= limit:
        print(f"note: --max-new-tokens {config.max_new_tokens:,} is capped by the model's context of {limit:,} "
              "tokens (prompt included)", file=sys.stderr)  # fmt: skip


def cmd_run(args: argparse.Namespace) -> int:
    """Exit status 0; 1 when a --json-schema answer was cut before its JSON ended."""
    config = generation_config(args)  # a bad schema file fails before the model loads
    pipe = load_pipeline(args)
    images = [args.image] if args.image else []
    warn_token_cap(pipe, config)
    if args.json:
        result = pipe.generate(args.prompt, images, config)
        print(json.dumps(result.as_dict(), ensure_ascii=False))
        return 0
    result = None
    shown = False

    def progress(done: int, total: int) -> None:
        nonlocal shown
        shown = True
        print(f"\r[prefill {done:,}/{total:,} tokens]", end="", file=sys.stderr, flush=True)

    for chunk in pipe.stream(args.prompt, images, config, progress=progress if args.verbose else None):
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
        from .constrained import parse_answer

        _, problem = parse_answer(result.text, result.finish_reason, len(result.token_ids))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .terminal_chat import run_terminal_chat

    pipe, config = load_pipeline(args), generation_config(args)
    warn_token_cap(pipe, config)
    return run_terminal_chat(pipe, config, system=args.system)


def cmd_demo_model(args: argparse.Namespace) -> int:
    from .demo import build_demo_model

    out = build_demo_model(Path(args.output), family=args.family, overwrite=args.overwrite)
    print(f"demo model ready at {out}\nnote: it has RANDOM weights; its answers are noise (for trying the tools offline)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .model import F32_PROPERTIES  # noqa: F401
    from .pipeline import Pipeline

    pipe = Pipeline(args.model, args.device)
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

    p = sub.add_parser("run", help="answer one prompt about an image (streams the answer)")
    add_model_args(p)
    p.add_argument("--image", help="image file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, finish_reason, timings")
    p.add_argument("-v", "--verbose", action="store_true", help="print finish reason and speed")
    add_generation_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive terminal chat (/image PATH, /reset, /exit)")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_generation_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo-model", help="build a small RANDOM-weight model to try the tools offline")
    p.add_argument("output")
    p.add_argument("--family", default="llava-next", choices=["llava-next", "llava"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo_model)

    p = sub.add_parser("info", help="show what an export holds and how it runs")
    p.add_argument("model")
    p.add_argument("--device", default="CPU")
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
