"""Command-line flags shared by the front ends: MODEL, generation settings, and the load settings' flags
(declared by `llava_ov.runtime.settings.LoadSettings`)."""

from __future__ import annotations

import argparse
import sys

from llava_ov.runtime.settings import LoadSettings


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's: -2..2, per token already in the answer")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's: -2..2, per occurrence in the answer")
    p.add_argument("--min-p", type=float, default=0.0, help="sampling keeps tokens >= this share of the likeliest")
    p.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN_ID=BIAS",
                   help="add BIAS (-100..100) to a token's logit (repeatable)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="answer with JSON valid under this JSON Schema (constrained decoding)")  # fmt: skip
    p.add_argument("--regex", default=None, help="answer with text matching this regular expression (constrained)")
    p.add_argument("--grammar", metavar="FILE", default=None,
                   help="answer with text this Lark grammar derives (llguidance's dialect; constrained)")  # fmt: skip
    add_speculation_args(p)
    add_image_token_args(p)
    add_video_args(p)


def add_speculation_args(p: argparse.ArgumentParser) -> None:
    """Several tokens per forward (proposed, then verified: the answer stays the one plain decoding gives)."""
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="propose up to N tokens per step from earlier text (prompt lookup; helps answers that "
                        "copy the prompt); 0: off")  # fmt: skip
    p.add_argument("--no-jump-forward", action="store_true",
                   help="sample every token a grammar forces instead of proposing them all in one forward")


def add_video_args(p: argparse.ArgumentParser) -> None:
    """How frames are sampled from a video (LLaVA-NeXT-Video models)."""
    p.add_argument("--num-frames", type=int, default=None, metavar="N",
                   help="frames sampled uniformly from each video (default: the model's own, 32 for LLaVA-NeXT-Video, "
                        "fewer when the context cannot hold them)")  # fmt: skip
    p.add_argument("--video-fps", type=float, default=None, metavar="FPS",
                   help="or sample this many frames per second of video (not with --num-frames)")


def add_image_token_args(p: argparse.ArgumentParser) -> None:
    """Fewer image tokens for a faster first token (docs/speed.md)."""
    p.add_argument("--max-image-tokens", type=int, default=None, metavar="N",
                   help="image tokens per request at most: each image at the largest resolution of the model's "
                        "own grid list that fits, down to the base tile (default: no limit)")  # fmt: skip
    p.add_argument("--visual-token-pruning", type=float, default=0.0, metavar="RATIO",
                   help="drop this share (0-0.99) of each image's tokens, chosen for the question by CDPruner "
                        "(default 0: off)")  # fmt: skip


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --weight-format for a hub id, and every load setting (`LoadSettings.add_arguments`)."""
    p.add_argument("model", help="export directory, or a Hugging Face hub id (converted on first use)")
    p.add_argument("--weight-format", default="int4", help="for a hub id converted on first use (default int4)")
    LoadSettings.add_arguments(p)


def parse_logit_bias(items: list[str]) -> dict[int, float] | None:
    """TOKEN_ID=BIAS flags as logit_bias (LlavaOvError for a malformed one)."""
    from llava_ov.errors import LlavaOvError

    bias = {}
    for item in items:
        token, _, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise LlavaOvError(f"--logit-bias takes TOKEN_ID=BIAS (e.g. 2=-100), not {item!r}") from None
    return bias or None


def generation_config(args: argparse.Namespace):
    from llava_ov.runtime.constrained import load_grammar, load_schema
    from llava_ov.runtime.generate import GenerationConfig

    schema = getattr(args, "json_schema", None)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=list(args.stop),
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, min_p=args.min_p,
        logit_bias=parse_logit_bias(args.logit_bias),
        json_schema=load_schema(schema) if schema else None,
        regex=getattr(args, "regex", None),
        grammar=load_grammar(args.grammar) if getattr(args, "grammar", None) else None,
        max_image_tokens=getattr(args, "max_image_tokens", None),
        visual_token_pruning=getattr(args, "visual_token_pruning", 0.0),
        num_frames=getattr(args, "num_frames", None), video_fps=getattr(args, "video_fps", None),
        prompt_lookup=getattr(args, "prompt_lookup", 0), jump_forward=not getattr(args, "no_jump_forward", False),
    )  # fmt: skip
    config.validate()  # before the model loads
    return config


def load_pipeline(args: argparse.Namespace):
    """The Pipeline the model flags ask for (MODEL resolved, converted if needed); warnings to stderr."""
    from llava_ov.exporting.hub import resolve_model
    from llava_ov.runtime.pipeline import Pipeline

    settings = LoadSettings.from_args(args).validate()  # a bad value fails before a hub id is converted
    pipe = Pipeline(resolve_model(args.model, weight_format=args.weight_format), settings)
    for warning in pipe.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    return pipe


def warn_token_cap(pipe, config) -> None:
    """Say so when --max-new-tokens cannot be reached: answers stop at the context."""
    limit = pipe.model.max_context
    if config.max_new_tokens >= limit:
        print(f"note: --max-new-tokens {config.max_new_tokens:,} is capped by the model's context of {limit:,} "
              "tokens (prompt included)", file=sys.stderr)  # fmt: skip
