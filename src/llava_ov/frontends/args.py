"""Command-line flags shared by the front ends: model loading, engine and generation settings."""

from __future__ import annotations

import argparse
import sys

from llava_ov.errors import LlavaOvError


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
    from llava_ov.runtime.engine.core import EngineConfig

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
    from llava_ov.common.layout import MODEL_PARTS

    out = {}
    for pair in pairs:
        part, sep, value = pair.partition("=")
        if not sep or part not in MODEL_PARTS or not value:
            raise LlavaOvError(f"--part-{what} expects PART={what.upper()} with PART one of {', '.join(MODEL_PARTS)}")
        out[part] = value
    return out


def generation_config(args: argparse.Namespace):
    from llava_ov.runtime.constrained import load_schema
    from llava_ov.runtime.generate import GenerationConfig

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
    from llava_ov.runtime.engine.core import EngineConfig

    d = EngineConfig()
    return EngineConfig(
        kv_cache_gb=getattr(args, "kv_cache_gb", None),
        max_step_tokens=getattr(args, "max_step_tokens", d.max_step_tokens),
        max_running=getattr(args, "max_running", d.max_running),
    )


def pipeline_options(args: argparse.Namespace) -> dict:
    """Pipeline keyword arguments from the model options (MODEL resolved, converted if needed)."""
    from llava_ov.exporting.hub import resolve_model
    from llava_ov.runtime.model import F32_PROPERTIES

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
    from llava_ov.runtime.pipeline import Pipeline

    pipe = Pipeline(**pipeline_options(args))
    for warning in pipe.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    return pipe


def warn_token_cap(pipe, config) -> None:
    """Say so when --max-new-tokens cannot be reached: answers stop at the context."""
    limit = pipe.model.max_context
    if config.max_new_tokens >= limit:
        print(f"note: --max-new-tokens {config.max_new_tokens:,} is capped by the model's context of {limit:,} "
              "tokens (prompt included)", file=sys.stderr)  # fmt: skip
