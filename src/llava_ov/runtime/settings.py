"""`LoadSettings`: how an export is loaded and run, declared once (vLLM's EngineArgs is the model).

Every setting is one dataclass field whose metadata holds its command-line flag, help text and
check. `LoadSettings.add_arguments(parser)` generates the flags of every front end (run, chat,
info, ui, serve, batch, bench, evaluate) and `LoadSettings.from_args(args)` builds the settings
back; `Pipeline(model_dir, settings)` loads with them and the engine reads its own fields
(`kv_cache_gb`, `max_step_tokens`, `max_running`). Adding a setting means adding a field here
and using it where it applies. Request settings live in `GenerationConfig`, server limits with
the server. Imports only the standard library, so building a parser stays cheap.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any

from llava_ov.common.layout import ALL_PARTS as MODEL_PARTS
from llava_ov.errors import LlavaOvError

F32_PROPERTIES = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
ENGINE_GROUP = "engine (paged KV cache, continuous batching)"
MAX_DRAFT_TOKENS = 16  # speculative.MAX_PROPOSED (this module imports only the standard library)


def parse_parts(pairs: list[str], what: str) -> dict[str, str]:
    """PART=VALUE options into a dict, with a clear error for anything else."""
    out = {}
    for pair in pairs:
        part, sep, value = pair.partition("=")
        if not sep or part not in MODEL_PARTS or not value:
            raise LlavaOvError(f"--part-{what} expects PART={what.upper()} with PART one of {', '.join(MODEL_PARTS)}")
        out[part] = value
    return out


def _setting(
    value: Any,
    help: str,
    *,
    flag: str = "",
    group: str | None = None,
    check: Callable[[Any], str | None] | None = None,
    parse: Callable[[Any], Any] | None = None,
    argv: Callable[[Any], list[str]] | None = None,
    **argparse_kwargs: Any,
) -> Any:
    """A field defaulting to `value`, with its flag: `parse` turns the parsed flag into the value and
    `argv` a value back into flags (both default to the value itself); `check` says what is wrong, or None."""
    meta = dict(help=help, flag=flag, group=group, check=check, parse=parse, argv=argv, argparse=argparse_kwargs)
    if isinstance(value, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=value, metadata=meta)


def _one_of(what: str, choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"unknown {what} {v!r} ({', '.join(choices)})"


def _at_least(flag: str, low: int) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v >= low else f"{flag} must be >= {low}"


def _parts(what: str) -> dict[str, Any]:
    """A PART=VALUE setting: repeatable flag, dict value."""
    flag = f"--part-{what}"
    return dict(
        flag=flag, action="append", default=[], metavar=f"PART={what.upper()}",
        parse=lambda pairs: parse_parts(pairs, what),
        argv=lambda parts: [t for part, value in parts.items() for t in (flag, f"{part}={value}")],
    )  # fmt: skip


def _f32_flag(properties: dict[str, Any]) -> list[str]:
    if properties and properties != F32_PROPERTIES:
        raise LlavaOvError(f"OpenVINO properties {properties} have no flag (only --f32 sets properties)")
    return ["--f32"] if properties else []


@dataclass(frozen=True)
class LoadSettings:
    """Every setting that decides how an export is loaded and run (picklable: Ray actors receive it)."""

    device: str = _setting("CPU", "CPU, GPU, NPU or AUTO")
    devices: dict[str, str] = _setting(
        {}, "run one part on another device, e.g. vision=GPU", **_parts("device")
    )  # per part: vision / text_embeddings / language
    part_paths: dict[str, str] = _setting(
        {}, "use another IR (or export dir) for one part: vision, text_embeddings or language; "
            "e.g. language=exports/int4 to mix precisions", **_parts("model"),
    )  # fmt: skip
    # OpenVINO properties for every part; the flag sets the f32 pins (reference numerics)
    properties: dict[str, Any] = _setting(
        {}, "pin f32 inference and KV cache (reference numerics)", flag="--f32", action="store_true", default=False,
        parse=lambda on: dict(F32_PROPERTIES) if on else {}, argv=_f32_flag,
    )  # fmt: skip
    # Compiled-model cache. "default": the user cache dir, for GPU/NPU parts only (model.cache_dir_for
    # says why); a path: that dir, for every device; None: off.
    cache_dir: str | None = _setting(
        "default", "compiled-model cache: a directory, 'default' (the user cache, for GPU and NPU parts; CPU "
                   "parts compile fresh) or 'off'", metavar="DIR",
        parse=lambda v: None if v == "off" else v, argv=lambda v: ["--cache-dir", "off" if v is None else v],
    )  # fmt: skip
    # A vision encoder of an INT8-PTQ export keeps the float one beside it: "auto" runs the INT8 one on CPUs
    # with int8 matrix units (AMX-INT8, AVX-512 VNNI, AVX-VNNI), where it is faster, else the float one.
    vision_encoder: str = _setting(
        "auto", "with an INT8-PTQ export: auto runs it where the CPU has int8 units (AMX, VNNI), else the "
                "float encoder kept beside it (`llava-ov info` says which and why)",
        choices=("auto", "int8", "float"), check=_one_of("vision encoder choice", ("auto", "int8", "float")),
    )  # fmt: skip
    # The language model's KV cache: "paged" (the engine's block pool, many sequences), "stateful" (the
    # export's own state, one sequence) or "auto": paged, except on NPU (no PagedAttention there).
    kv_cache: str = _setting(
        "auto", "paged: many sequences share a KV block pool (default; auto picks stateful on NPU); "
                "stateful: the export's own cache, one sequence at a time",
        group=ENGINE_GROUP, choices=("auto", "paged", "stateful"),
        check=_one_of("KV cache kind", ("auto", "paged", "stateful")),
    )  # fmt: skip
    kv_cache_gb: float | None = _setting(
        None, "KV block pool size (default: min(4 GiB, a quarter of free memory))", group=ENGINE_GROUP, type=float,
        check=lambda v: None if v is None or v > 0 else "--kv-cache-gb must be > 0",
    )  # fmt: skip
    max_step_tokens: int = _setting(
        256, "tokens per forward: decode tokens plus prefill chunks", group=ENGINE_GROUP, type=int,
        check=_at_least("--max-step-tokens", 1),
    )  # fmt: skip
    max_running: int = _setting(
        32, "sequences decoding at once", group=ENGINE_GROUP, type=int, check=_at_least("--max-running", 1)
    )
    # The paged LM's decode steps: "same" compilation as prefill, or "f32": a second compilation at f32
    # (faster INT4 decode where the CPU computes bf16 by default, for a second copy of the weights);
    # "auto": f32 where that pays and memory allows (ExportedModel.decode_choice).
    decode_precision: str = _setting(
        "auto", "f32: decode steps run on a second f32 compilation of the language model; on CPUs that compute "
                "bf16 by default, INT4 weights then decode ~1.35x faster while prompts still prefill at bf16, "
                "for a second copy of the LM weights in memory; auto (default): f32 where that holds and memory "
                "allows (`llava-ov info` says which)",
        group=ENGINE_GROUP, choices=("auto", "same", "f32"), check=_one_of("decode precision", ("auto", "same", "f32")),
    )  # fmt: skip

    # The CPU plugin's activation group for dynamically quantized INT4 matmuls: its own default (32), or the
    # INT4 weights' group; "auto" measures both at first load (runtime/decode_choice.py).
    dq_group_size: str = _setting(
        "auto", "activation group of the language model's dynamically quantized INT4 matmuls on CPU: plugin "
                "(its default, 32), weights (the INT4 weights' own group, e.g. 64) or auto (default: both timed "
                "at first load, the faster kept and remembered; `llava-ov info` says which)",
        group=ENGINE_GROUP, choices=("auto", "plugin", "weights"),
        check=_one_of("dq group choice", ("auto", "plugin", "weights")),
    )  # fmt: skip
    # A smaller export with the same tokenizer proposing tokens the language model verifies (runtime/draft.py).
    draft: str | None = _setting(
        None, "a smaller export with the same tokenizer (e.g. LLaVA-OneVision 0.5B for 7B) that proposes "
              "--draft-tokens tokens per step for the model to verify: answers stay the same, decoding is faster "
              "when the draft often agrees", group=ENGINE_GROUP, metavar="EXPORT_DIR",
    )  # fmt: skip
    draft_tokens: int = _setting(
        4, "tokens the draft model proposes per step", group=ENGINE_GROUP, type=int, metavar="K",
        check=lambda v: None if 1 <= v <= MAX_DRAFT_TOKENS else f"--draft-tokens must be in [1, {MAX_DRAFT_TOKENS}]",
    )  # fmt: skip
    draft_max_running: int = _setting(
        2, "the draft model proposes only while at most this many answers use it (it drafts for one sequence "
           "after another: with more, its forwards would cost more than they save)", group=ENGINE_GROUP, type=int,
        metavar="N", check=_at_least("--draft-max-running", 1),
    )  # fmt: skip

    vision_requests: int | None = _setting(
        None, "images encoded at once (infer requests of the vision encoder; default: the plugin's "
              "OPTIMAL_NUMBER_OF_INFER_REQUESTS, 1 on CPU, where one encode already uses every core)",
        type=int, metavar="N", check=_at_least("--vision-requests", 1),
    )  # fmt: skip

    vision_threads: int | None = _setting(
        None, "CPU threads for the vision encoder (INFERENCE_NUM_THREADS of its compilation; default: the "
              "plugin's own)", type=int, metavar="N", check=_at_least("--vision-threads", 1),
    )  # fmt: skip

    # ------------------------------------------------------------ the command line

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per setting (engine settings in their own help group)."""
        groups: dict[str | None, Any] = {None: parser}
        for f in fields(cls):
            meta = f.metadata
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            kwargs = {"default": _default_value(f), **meta["argparse"], "dest": _dest(f), "help": meta["help"]}
            groups[meta["group"]].add_argument(_flag(f), **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoadSettings:
        """The settings the flags of `add_arguments` were parsed into."""
        values = {}
        for f in fields(cls):
            value, parse = getattr(args, _dest(f)), f.metadata["parse"]
            values[f.name] = parse(value) if parse else value
        return cls(**values)

    def to_argv(self) -> list[str]:
        """The flags that give these settings (only those that differ from the defaults)."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != _default_value(f):
                unparse = f.metadata["argv"]
                argv += unparse(value) if unparse else [_flag(f), str(value)]
        return argv

    # ------------------------------------------------------------ checks and derived values

    def validate(self) -> LoadSettings:
        """Refuse what cannot load, with the flag's own words (before any model is compiled)."""
        for f in fields(self):
            check = f.metadata["check"]
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                raise LlavaOvError(problem)
        for name in ("devices", "part_paths"):
            unknown = set(getattr(self, name)) - set(MODEL_PARTS)
            if unknown:
                raise LlavaOvError(f"{name}: unknown part {', '.join(sorted(unknown))} (parts: {', '.join(MODEL_PARTS)})")
        if self.decode_precision == "f32" and self.kv_backend() != "paged":
            raise LlavaOvError("a decode precision of its own needs the paged KV cache (kv_cache='paged')")
        if self.draft is not None and self.kv_backend() != "paged":
            raise LlavaOvError("a draft model needs the paged KV cache (kv_cache='paged')")
        return self

    def device_for(self, part: str) -> str:
        """The device one part (vision / text_embeddings / language) runs on."""
        return self.devices.get(part, self.device)

    def kv_backend(self) -> str:
        """"paged" or "stateful": `kv_cache`, with "auto" resolved for the language model's device."""
        if self.kv_cache != "auto":
            return self.kv_cache
        return "stateful" if "NPU" in self.device_for("language").upper() else "paged"

    def with_overrides(self, **overrides: Any) -> LoadSettings:
        """A copy with some fields changed (`Pipeline(path, device="GPU")`); unknown names are an error."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            known = ", ".join(sorted(names))
            raise TypeError(f"unknown load setting(s) {', '.join(unknown)}; LoadSettings has {known}")
        return replace(self, **overrides)


def _flag(f: Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _dest(f: Field) -> str:
    return _flag(f).lstrip("-").replace("-", "_")


def _default_value(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default

