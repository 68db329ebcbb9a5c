"""Hugging Face LLaVA checkpoint -> OpenVINO export directory.

Three IRs (vision embeddings, text embeddings, stateful language model), the
tokenizer/detokenizer IRs, the config and processor files and export_info.json,
in optimum-intel's layout.  Torch and transformers are needed here only.

Memory: weights load in their stored dtype (fp16/bf16 for Hub checkpoints);
16-bit modules are traced through OpenVINO's 16-bit patching so no fp32 copy of
the weights is made; parts are converted one at a time and freed after saving.
The export is written to a temporary sibling directory and renamed at the end,
so a failed conversion never leaves a half-written export behind.
"""

from __future__ import annotations

import datetime as _dt
import errno
import gc
import json
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_ov.common import layout
from llava_ov.errors import DiskFullError, LlavaOvError, ModelNotFoundError
from llava_ov.runtime.families import FamilyEntry as Family, family_for
from llava_ov.runtime.export import VIDEO_SETTINGS_FILE
from llava_ov.exporting.fp16 import compress_keeping_rotary_f32
from llava_ov.common.layout import looks_like_path
from llava_ov.common.progress import Phases
from llava_ov.exporting.staging import publish, staging_dir
from llava_ov.exporting.stateful import kv_names, make_stateful, name_ports

WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")


@dataclass
class ConvertOptions:
    weight_format: str = "fp16"  # fp32 | fp16 | int8 | int4
    overwrite: bool = False
    revision: str | None = None
    quant: Any = None  # quantize.QuantConfig for int8/int4; None: defaults
    show_progress: bool = True
    check_resources: bool = True  # refuse, before loading, what will not fit memory or disk (resources.py)


# ---------------------------------------------------------------- loading


def _check_hub_reachable(src: str, timeout_s: float = 5.0) -> None:
    """Fail in one line, at once, when the Hub's host cannot even be resolved (offline machine):
    huggingface_hub would retry for ~25 s first. Offline mode (HF_HUB_OFFLINE=1) skips this."""
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    host = urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    failure: list[BaseException] = []
    probe = threading.Thread(target=lambda: _resolve(host, failure), daemon=True)  # getaddrinfo has no timeout
    probe.start()
    probe.join(timeout_s)
    if failure or probe.is_alive():
        reason = f"{type(failure[0]).__name__}: {failure[0]}" if failure else f"no answer in {timeout_s:g} s"
        raise ModelNotFoundError(
            f"{src!r} is not a local directory, and the Hugging Face Hub ({host}) cannot be reached ({reason}); "
            "give a local checkpoint or export directory, or set HF_HUB_OFFLINE=1 to use the local Hub cache"
        )


def _resolve(host: str, failure: list[BaseException]) -> None:
    import socket

    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        failure.append(exc)


def read_source_config(src: str, revision: str | None = None) -> tuple[dict, str | None]:
    """config.json of a local checkpoint dir or hub id, and the resolved revision."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{src} is a file; expected a checkpoint directory or a hub id")
        cfg = path / "config.json"
        if (path / layout.LANGUAGE_MODEL).exists():
            raise ModelNotFoundError(f"{src} is already a llava-ov export; convert takes a transformers checkpoint")
        if not cfg.exists():
            raise ModelNotFoundError(f"{src} has no config.json; is it a transformers checkpoint?")
        return json.loads(cfg.read_text()), None
    if looks_like_path(src):
        raise ModelNotFoundError(f"no such directory: {src}")
    _check_hub_reachable(src)
    try:
        from huggingface_hub import constants, hf_hub_download

        cfg_path = hf_hub_download(src, "config.json", revision=revision)
    except Exception as exc:  # network, auth, missing repo: all one message for the user
        if constants.HF_HUB_OFFLINE:
            raise ModelNotFoundError(
                f"{src!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it: "
                "unset HF_HUB_OFFLINE (or run once online), or give a local checkpoint or export directory"
            ) from None
        raise ModelNotFoundError(
            f"{src!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    resolved = Path(cfg_path).parent.name  # snapshots/<commit>/config.json
    return json.loads(Path(cfg_path).read_text()), resolved


def text_input_channels(config: dict) -> set[int]:
    """Input widths of the language model's weight matrices, defaults filled in by transformers."""
    import transformers

    cfg = dict(config)
    text = transformers.AutoConfig.for_model(**cfg).text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {text.hidden_size, text.intermediate_size, text.num_attention_heads * head_dim}


def checkpoint_size(src: str, config: dict) -> tuple[float, int, float]:
    """(bytes of the weights as stored, bytes per value, language model's share of the values).

    Counted on a model built on the meta device (no memory); a local checkpoint's own files give the bytes.
    """
    import transformers

    from llava_ov.exporting.random_models import weight_shapes

    cfg = dict(config)
    shapes = weight_shapes(family_for(cfg).architecture, transformers.AutoConfig.for_model(**cfg))
    counts = {name: math.prod(shape) for name, shape in shapes.items()}
    values = sum(counts.values())
    lm_values = sum(n for name, n in counts.items() if "language_model" in name or name.startswith("lm_head"))
    path = Path(src).expanduser()
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin")) if path.is_dir() else []
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype") or "float16")
    stored = sum(f.stat().st_size for f in files) if files else values * (4 if "32" in dtype else 2)
    return float(stored), 4 if stored / values > 3 else 2, lm_values / values


def check_convert_resources(src: str, config: dict, out: Path, weight_format: str) -> None:
    """Refuse a conversion that cannot fit this machine's memory or disk, before any loading."""
    from llava_ov.exporting.resources import check, convert_need

    stored, per_value, lm_share = checkpoint_size(src, config)
    check(convert_need(stored, per_value, weight_format, out, lm_share))


def load_checkpoint(src: str, family: Family, revision: str | None = None):
    """Load model (stored dtype, strict) and processor; any missing/unexpected weight is an error."""
    import transformers

    model_cls = getattr(transformers, family.architecture)
    model, info = model_cls.from_pretrained(
        src, revision=revision, dtype="auto", attn_implementation="sdpa", output_loading_info=True
    )
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        detail = "; ".join(f"{k}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for k, v in problems.items())
        raise LlavaOvError(f"checkpoint weights do not match {family.architecture}: {detail or info['error_msgs']}")
    processor = family.export_hooks().load_processor(src, revision)
    return model.eval(), processor


# ---------------------------------------------------------------- tracing


def _traceable(model) -> None:
    """Keep 16-bit weights 16-bit in the IR while tracing with fp32 activations."""
    import torch

    if model.dtype != torch.float32:
        from openvino.frontend.pytorch.patch_model import __make_16bit_traceable as make_16bit_traceable

        make_16bit_traceable(model)


def text_embeddings_module(model):
    import torch

    class TextEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = model.get_input_embeddings()

        def forward(self, input_ids):
            return self.embed(input_ids)

    return TextEmbeddings().eval()


class _TraceCache:
    """Minimal cache for tracing: concatenates explicit past tensors, records presents."""

    def __init__(self, past):
        self.past = list(past)
        self.present = [None] * len(self.past)

    def update(self, key, value, layer_idx, **_):
        import torch

        past_k, past_v = self.past[layer_idx]
        key, value = torch.cat([past_k, key], dim=-2), torch.cat([past_v, value], dim=-2)
        self.present[layer_idx] = (key, value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0):
        return self.past[layer_idx][0].shape[-2]


def language_module(model):
    """Decoder + lm_head on the last position only; explicit KV inputs/outputs for tracing."""
    import torch

    class LanguageModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = model.model.language_model
            self.lm_head = model.lm_head

        def forward(self, inputs_embeds, attention_mask, position_ids, past):
            mask = causal_mask(inputs_embeds, attention_mask)
            cache = _TraceCache(past)
            out = self.decoder(
                inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
            )
            # Slice before lm_head: a 2,000-token prefill must not make a 2,000 x vocab tensor.
            logits = self.lm_head(out.last_hidden_state[:, -1:, :])
            return (logits.float(), *[t for kv in cache.present for t in kv])

    return LanguageModel().eval()


def causal_mask(inputs_embeds, attention_mask):
    """4D additive mask: query i (at kv index past+i) sees key j <= past+i with attention_mask[j] = 1."""
    import torch

    q_len, kv_len = inputs_embeds.shape[1], attention_mask.shape[1]
    query_pos = torch.arange(q_len) + (kv_len - q_len)
    allowed = torch.arange(kv_len)[None, :] <= query_pos[:, None]
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    zeros = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype)
    return zeros.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)


def convert_vision(model, family: Family):
    """The family's vision tower + projector (its export hooks say how it is wrapped) as an OpenVINO model."""
    import openvino as ov
    import torch

    cfg = model.config.vision_config
    size = cfg.image_size
    example = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ov_model = ov.convert_model(
            family.export_hooks().vision_module(model), example_input=example, input=[("pixel_values", [-1, 3, size, size], ov.Type.f32)]
        )
    name_ports(ov_model, ["pixel_values"], ["last_hidden_state"])
    return ov_model


def convert_stage(stage):
    """One vision stage of a family (projector, resampler) as an OpenVINO model with a dynamic batch."""
    import openvino as ov
    import torch

    with torch.no_grad():
        ov_model = ov.convert_model(stage.module, example_input=stage.example, input=[(stage.input_name, stage.shape, ov.Type.f32)])
    name_ports(ov_model, [stage.input_name], ["last_hidden_state"])
    return ov_model


def convert_text_embeddings(model):
    import openvino as ov
    import torch

    example = torch.ones(1, 4, dtype=torch.int64)
    with torch.no_grad():
        ov_model = ov.convert_model(text_embeddings_module(model), example_input=example)
    name_ports(ov_model, ["input_ids"], ["inputs_embeds"])
    return ov_model


def convert_language_model(model):
    import openvino as ov
    import torch

    text = model.config.text_config
    layers = text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    batch, past_len, new_len = 2, 3, 4  # non-trivial sizes so nothing is specialised to 1
    kv = (batch, text.num_key_value_heads, past_len, head_dim)
    example = dict(
        inputs_embeds=torch.randn(batch, new_len, text.hidden_size),
        attention_mask=torch.ones(batch, past_len + new_len, dtype=torch.int64),
        position_ids=torch.arange(past_len, past_len + new_len).repeat(batch, 1),
        past=[(torch.randn(kv), torch.randn(kv)) for _ in range(layers)],
    )
    with torch.no_grad():
        ov_model = ov.convert_model(language_module(model), example_input=example)
    kv_in, kv_out = kv_names(layers)
    name_ports(ov_model, ["inputs_embeds", "attention_mask", "position_ids", *kv_in], ["logits", *kv_out])
    make_stateful(ov_model, layers)
    return ov_model


# ---------------------------------------------------------------- files


def save_ir(ov_model, path: Path, weight_format: str) -> dict[str, str]:
    """Save an IR; returns its export_info entry: the precision of its float weights, and
    for fp16 whether rotary frequencies were kept in fp32 (see fp16.py)."""
    import openvino as ov

    if weight_format == "fp32":
        ov.save_model(ov_model, str(path), compress_to_fp16=False)
        return {"precision": "fp32", "rotary_frequencies": "fp32"}
    kept = compress_keeping_rotary_f32(ov_model)
    ov.save_model(ov_model, str(path), compress_to_fp16=False)
    return {"precision": "fp16", "rotary_frequencies": "fp32" if kept else "none"}


def write_tokenizers(processor, out: Path) -> None:
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer

    tok = processor.tokenizer
    if getattr(processor, "chat_template", None):
        tok.chat_template = processor.chat_template
    ov_tok, ov_detok = convert_tokenizer(tok, with_detokenizer=True, skip_special_tokens=True)
    ov.save_model(ov_tok, str(out / layout.TOKENIZER_MODEL))
    ov.save_model(ov_detok, str(out / layout.DETOKENIZER_MODEL))


def write_config_files(model, processor, out: Path, family: Family) -> None:
    """config.json (full, + the family's extras), generation, processor, tokenizer and template files."""
    cfg = {**model.config.to_dict(), **family.export_hooks().config_extras(model)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    # transformers 5 no longer writes preprocessor_config.json; VLMPipeline silently
    # falls back to default (unnormalised) preprocessing without it.
    image_proc = processor.image_processor.to_dict()
    (out / "preprocessor_config.json").write_text(json.dumps(image_proc, indent=2) + "\n")
    if processor.chat_template and not (out / layout.CHAT_TEMPLATE).exists():
        (out / layout.CHAT_TEMPLATE).write_text(processor.chat_template)


# Where checkpoints keep their video processor's settings (OneVision's Hub repos: the subfolder form)
VIDEO_SETTINGS_SOURCES = (VIDEO_SETTINGS_FILE, "video_processor/preprocessor_config.json")


def copy_video_settings(src: str, revision: str | None, out: Path) -> Path | None:
    """The checkpoint's video-processor settings, copied to the export's VIDEO_SETTINGS_FILE (the runtime's
    per-frame preprocessing reads them there; without them it uses the image settings, as transformers does)."""
    from transformers.utils import cached_file

    for name in VIDEO_SETTINGS_SOURCES:
        try:
            found = cached_file(src, name, revision=revision, _raise_exceptions_for_missing_entries=False)
        except Exception:  # noqa: BLE001 - an unreachable or odd hub file: the image settings stand in, as without one
            found = None
        if found:
            settings = json.loads(Path(found).read_text())
            (out / VIDEO_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
            return out / VIDEO_SETTINGS_FILE
    return None


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps ~1.4 GiB of tracing activations otherwise)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def source_notes(src: str) -> list[str]:
    """Warnings that travel with the export (a random-weight checkpoint says so)."""
    from llava_ov.exporting.random_models import RANDOM_WEIGHTS_MARKER

    marker = Path(src) / RANDOM_WEIGHTS_MARKER
    return [marker.read_text().strip()] if marker.exists() else []


# ---------------------------------------------------------------- driver


def convert(src: str, out: str | Path, options: ConvertOptions | None = None) -> Path:
    """Convert checkpoint `src` (local dir or hub id) into an export directory `out`."""
    opts = options or ConvertOptions()
    if opts.weight_format not in WEIGHT_FORMATS:
        raise LlavaOvError(f"unknown weight format {opts.weight_format!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    out = Path(out).expanduser()
    source_cfg, resolved = read_source_config(src, opts.revision)
    family = family_for(source_cfg)
    compress = opts.weight_format in ("int8", "int4")
    if compress:  # bad compression settings fail now, not after a long conversion
        from llava_ov.exporting.quantize import check_settings_for_config

        check_settings_for_config(opts.quant, opts.weight_format, text_input_channels(source_cfg))
    if opts.check_resources:
        check_convert_resources(src, source_cfg, out, opts.weight_format)
    phases = Phases("convert", 6 + len(family.runtime_module().FAMILY.stages), enabled=opts.show_progress)
    tmp = staging_dir(out, opts.overwrite)
    try:
        info = _convert_into(src, tmp, family, opts, phases)
        info.revision = opts.revision or resolved
        info.save(tmp)
        if compress:
            from llava_ov.exporting.quantize import compress_export

            phases.note(f"compressing weights ({opts.weight_format}) with NNCF")
            compress_export(tmp, tmp, opts.quant, weight_format=opts.weight_format, in_place=True,
                            progress=opts.show_progress, check_resources=False)  # checked with the conversion
        publish(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"no space left on the device while writing {out}; free space and retry") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _convert_into(src: str, out: Path, family: Family, opts: ConvertOptions, phases: Phases) -> layout.ExportInfo:
    import transformers

    transformers.logging.set_verbosity_error()  # our phases report progress; tracer chatter is noise
    transformers.utils.logging.disable_progress_bar()  # and one line per phase, not "Loading weights" bars
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _convert_parts(src, out, family, opts, phases)


def _convert_parts(src: str, out: Path, family: Family, opts: ConvertOptions, phases: Phases) -> layout.ExportInfo:
    fmt = "fp16" if opts.weight_format in ("int8", "int4") else opts.weight_format
    with phases.phase(f"loading {src}"):
        model, processor = load_checkpoint(src, family, opts.revision)
        stored_dtype = str(model.dtype).replace("torch.", "")
        _traceable(model)
    parts: dict[str, dict[str, Any]] = {}
    stages = family.export_hooks().stages(model)
    steps = [
        ("vision", "vision embeddings (CLIP + projector)" if not stages else "vision tower", lambda m: convert_vision(m, family)),
        *[(part, f"vision {part}", lambda m, s=stage: convert_stage(s)) for part, stage in stages.items()],
        ("text_embeddings", "text embeddings", convert_text_embeddings),
        ("language", "language model (stateful KV cache)", convert_language_model),
    ]
    for part, label, fn in steps:
        with phases.phase(f"tracing and saving {label}"):
            ov_model = fn(model)
            stored = save_ir(ov_model, out / layout.ALL_PARTS[part], fmt)
            parts[part] = {"file": layout.ALL_PARTS[part], **stored}
            del ov_model
            release_memory()
    with phases.phase("converting tokenizer and detokenizer"):
        write_tokenizers(processor, out)
    with phases.phase("writing config, processor and chat-template files"):
        write_config_files(model, processor, out, family)
        copy_video_settings(src, opts.revision, out)
    del model
    release_memory()
    info = layout.ExportInfo(
        source=str(src),
        family=family.model_type,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=layout.library_versions(),
        parts=parts,
        compression={"source_dtype": stored_dtype, "weight_format": fmt},
        timings_s={k: round(v, 2) for k, v in phases.timings.items()},
        notes=source_notes(src),
    )
    info.save(out)
    return info
