"""NNCF compression of an export directory: LM weights INT4/INT8, text embeddings INT8, vision INT8.

Owns `QuantConfig`, `compress_export` (an export dir -> a compressed export dir,
or the same dir in place) and `weight_stats` (what an IR stores its weights as).

Parts and what is done to them:
- language model: `nncf.compress_weights`; int4_sym/int4_asym with `group_size`
  and `ratio` (share of the ratio-defining MatMul weights in INT4 - NNCF keeps
  the last MatMul, lm_head, in the INT8_ASYM backup), or int8 = INT8_ASYM
  per-channel.  `awq=True` adds AWQ + scale estimation on calibration prompts
  (and makes the INT4/INT8 choice data-aware: max activation variance).  NNCF
  3.4's AWQ patterns match only the MLP down projections of these LMs; at
  ratio < 1 those are often kept INT8, and AWQ then changes nothing (reported
  as awq_layers = 0 in export_info.json, with a printed note).
- text embeddings: INT8_ASYM weight-only when the LM is compressed.
- vision encoder: "int8" = INT8_ASYM weight-only; "int8_ptq" = `nncf.quantize`
  (ModelType.TRANSFORMER, SmoothQuant alpha 0.6 for MatMul) on real images,
  i.e. INT8 weights and activations (FakeQuantize ops in the IR).

Group size: a group size that does not divide the input channels of every
language-model MatMul is refused up front with LlavaOvError listing the valid
sizes, before any work (NNCF 3.4 raises its own error only after loading and,
with AWQ, after calibration; its IGNORE/ADJUST fallbacks would quietly keep those
layers INT8 or give them another group size).  We raise rather than adjust:
group size trades accuracy for speed and is the user's explicit choice.

Calibration data (images, and prefill inputs for data-aware LM compression) comes
from `llava_ov.exporting.calibration`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from llava_ov.common import layout
from llava_ov.exporting.calibration import calibration_images, language_calibration, pixel_values_for
from llava_ov.errors import LlavaOvError, ModelNotFoundError
from llava_ov.common.progress import Phases
from llava_ov.exporting.staging import publish, staging_dir

LM_MODES = ("int4_sym", "int4_asym", "int8", "none")
VISION_MODES = ("none", "int8", "int8_ptq")
WEIGHT_FORMATS = ("int4", "int8")
SMOOTH_QUANT_ALPHA = 0.6  # MatMul alpha for the vision PTQ (NNCF's default for transformers is 0.95)
PART_LABELS = {"language": "language model", "text_embeddings": "text embeddings", "vision": "vision encoder"}
_INT_TYPES = ("u4", "i4", "u8", "i8", "nf4", "f4e2m1", "f8e4m3")


@dataclass
class QuantConfig:
    """What to compress and how; see the module docstring for each setting."""

    lm_mode: str = "int4_sym"  # int4_sym | int4_asym | int8 (INT8_ASYM weight-only) | none
    group_size: int = 64  # INT4 group size; -1: per output channel
    ratio: float = 0.6  # share of the LM's ratio-defining weights in INT4, the rest INT8_ASYM
    awq: bool = False  # data-aware INT4: AWQ + scale estimation
    calib_samples: int = 32  # prompts for data-aware LM compression
    text_embeddings_int8: bool = True  # INT8 text embeddings whenever the LM is compressed
    vision_mode: str = "none"  # none | int8 (weight-only) | int8_ptq (weights + activations)
    vision_calib_images: int = 50

    def validate(self) -> QuantConfig:
        if self.lm_mode not in LM_MODES:
            raise LlavaOvError(f"unknown language-model mode {self.lm_mode!r}; valid modes: {', '.join(LM_MODES)}")
        if self.vision_mode not in VISION_MODES:
            raise LlavaOvError(f"unknown vision mode {self.vision_mode!r}; valid modes: {', '.join(VISION_MODES)}")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size > 0):
            raise LlavaOvError(f"group size must be a positive integer or -1 (per channel), not {self.group_size!r}")
        if not 0 < self.ratio <= 1:
            raise LlavaOvError(f"ratio must be in (0, 1], not {self.ratio!r}")
        if self.awq and not self.lm_mode.startswith("int4"):
            raise LlavaOvError(f"awq needs an int4 language-model mode, not {self.lm_mode!r}")
        for name in ("calib_samples", "vision_calib_images"):
            if getattr(self, name) < 1:
                raise LlavaOvError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        return self

    @property
    def lm_precision(self) -> str:
        """How export_info.json names the LM precision, e.g. "int4_sym g64 r0.6 + int8"."""
        if self.lm_mode in ("none", "int8"):
            return {"none": "unchanged", "int8": "int8_asym"}[self.lm_mode]
        group = f"g{self.group_size}" if self.group_size > 0 else "per-channel"
        return f"{self.lm_mode} {group} r{self.ratio:g} + int8" + (" awq+se" if self.awq else "")


def resolve_config(quant: QuantConfig | None, weight_format: str | None) -> QuantConfig:
    """`quant` (default QuantConfig()) with the `weight_format` shortcut applied, validated.

    "int4": lm_mode int4_sym unless `quant` already asks for an int4 mode (its group
    size and ratio are kept: the defaults are the classic g64 r0.6); "int8": INT8_ASYM.
    """
    q = replace(quant) if quant is not None else QuantConfig()
    if weight_format is not None:
        if weight_format not in WEIGHT_FORMATS:
            raise LlavaOvError(f"unknown weight format {weight_format!r}; valid: {', '.join(WEIGHT_FORMATS)}")
        if weight_format == "int8":
            q.lm_mode = "int8"
        elif not q.lm_mode.startswith("int4"):
            q.lm_mode = "int4_sym"
    return q.validate()


# ---------------------------------------------------------------- weight statistics

_PASS_THROUGH = {"Convert", "Reshape", "Subtract", "Multiply", "Transpose", "Unsqueeze", "Squeeze", "FakeQuantize"}
_WEIGHT_INPUT = {"MatMul": 1, "Gather": 0, "Convolution": 1}


def _weight_constant(output) -> Any:
    """The Constant a weight input comes from, through decompression ops (first input each), or None."""
    node = output.get_node()
    for _ in range(8):
        kind = node.get_type_name()
        if kind == "Constant":
            return node
        if kind not in _PASS_THROUGH:
            return None
        node = node.input_value(0).get_node()
    return None


def weight_layers(model) -> list[dict[str, Any]]:
    """Every MatMul / Gather (embedding) / Convolution with a constant weight: name, storage type, shape."""
    layers = []
    for op in model.get_ordered_ops():
        port = _WEIGHT_INPUT.get(op.get_type_name())
        if port is None:
            continue
        const = _weight_constant(op.input_value(port))
        if const is None or (op.get_type_name() == "Gather" and len(const.get_output_shape(0)) < 2):
            continue
        shape = list(const.get_output_shape(0))
        entry = {
            "name": op.get_friendly_name(),
            "op": op.get_type_name(),
            "type": const.get_element_type().get_type_name(),
            "shape": shape,
            "elements": int(np.prod(shape)),
            "bytes": int(const.get_byte_size()),
        }
        if op.get_type_name() == "MatMul":
            dims = list(op.get_input_partial_shape(1).to_shape())  # after decompression: the logical [out, in]
            entry["in_channels"] = int(dims[-1] if op.get_attributes()["transpose_b"] else dims[-2])
        layers.append(entry)
    return layers


def weight_stats(model_or_path) -> dict[str, Any]:
    """What an IR stores its weights as.

    Returns {"weights": {type: {"tensors", "elements", "bytes"}}  - the weight tensors of
    MatMul/Gather/Convolution ops by storage type (u4/i4/u8/i8/f16/f32), "constants": the same
    for every Constant (scales and zero points included), "weight_bytes", "constant_bytes",
    "fake_quantize" (count of FakeQuantize ops), "layers" (see weight_layers) and, for a path,
    "bin_bytes"}.
    """
    import openvino as ov

    model = ov.Core().read_model(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    layers = weight_layers(model)
    weights: dict[str, dict[str, int]] = {}
    for layer in layers:
        row = weights.setdefault(layer["type"], {"tensors": 0, "elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["elements"] += layer["elements"]
        row["bytes"] += layer["bytes"]
    constants: dict[str, dict[str, int]] = {}
    fake_quantize = 0
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize":
            fake_quantize += 1
        if op.get_type_name() != "Constant":
            continue
        row = constants.setdefault(op.get_element_type().get_type_name(), {"tensors": 0, "elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["elements"] += int(np.prod(list(op.get_output_shape(0))))
        row["bytes"] += int(op.get_byte_size())
    out = {
        "weights": weights,
        "constants": constants,
        "weight_bytes": sum(r["bytes"] for r in weights.values()),
        "constant_bytes": sum(r["bytes"] for r in constants.values()),
        "fake_quantize": fake_quantize,
        "layers": layers,
    }
    if isinstance(model_or_path, (str, Path)):
        out["bin_bytes"] = Path(model_or_path).with_suffix(".bin").stat().st_size
    return out


def type_share(stats: dict[str, Any]) -> dict[str, float]:
    """Share of all weight elements per storage type (e.g. {"i4": 0.02, "u8": 0.98})."""
    counts: dict[str, int] = {}
    for layer in stats["layers"]:
        counts[layer["type"]] = counts.get(layer["type"], 0) + layer["elements"]
    total = sum(counts.values()) or 1
    return {k: round(v / total, 4) for k, v in sorted(counts.items())}


_ACTIVATIONS = {"Swish", "Gelu", "Sigmoid", "Relu", "HSwish", "Mish", "Tanh", "Elu", "SoftPlus", "HSigmoid"}


def awq_layers(model) -> int:
    """INT4 MatMuls NNCF 3.4's AWQ can correct: Act->MatMul or (MatMul|Act)->Multiply->MatMul.

    In these LMs that is the MLP down projection only (q/k/v/gate/up follow RMSNorm's
    Multiply by a constant); a mirror of NNCF's AWQ patterns, for reporting.
    """
    count = 0
    for op in model.get_ops():
        const = _weight_constant(op.input_value(1)) if op.get_type_name() == "MatMul" else None
        if const is None or const.get_element_type().get_type_name() not in ("u4", "i4"):
            continue
        src = op.input_value(0).get_node()
        feeds = [v.get_node().get_type_name() for v in src.input_values()] if src.get_type_name() == "Multiply" else []
        count += src.get_type_name() in _ACTIVATIONS or any(f in _ACTIVATIONS | {"MatMul"} for f in feeds)
    return count


def check_group_size(model, group_size: int) -> None:
    """Raise LlavaOvError unless `group_size` divides the input channels of every MatMul weight."""
    channels = {layer["in_channels"] for layer in weight_layers(model) if "in_channels" in layer}
    check_group_size_channels(channels, group_size)


def check_group_size_channels(channels, group_size: int) -> None:
    """The same check on a set of input-channel counts."""
    if group_size == -1:
        return
    channels = sorted(set(channels))
    bad = [c for c in channels if c % group_size]
    if bad:
        common = int(np.gcd.reduce(channels))
        valid = [g for g in (16, 32, 64, 128, 256) if common % g == 0]
        raise LlavaOvError(
            f"group size {group_size} does not divide the input channels {bad} of the language model's weights "
            f"(all input channel counts: {channels}); valid group sizes for this model: "
            f"{', '.join(map(str, valid + [-1]))} (-1 = per channel)"
        )


def check_settings_for_config(quant: QuantConfig | None, weight_format: str | None, text_channels) -> None:
    """Validate compression settings before converting (modes, ratio, group size vs the LM's channels)."""
    q = resolve_config(quant, weight_format)
    if q.lm_mode.startswith("int4"):
        check_group_size_channels(text_channels, q.group_size)


# ---------------------------------------------------------------- compression of one part


def compress_language(model, q: QuantConfig, samples: list[dict] | None = None):
    import nncf

    if q.lm_mode == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    kwargs: dict[str, Any] = {}
    if samples:
        kwargs = dict(
            dataset=nncf.Dataset(samples),
            subset_size=len(samples),
            awq=True,
            scale_estimation=True,
            sensitivity_metric=nncf.SensitivityMetric.MAX_ACTIVATION_VARIANCE,
        )
    return nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode(q.lm_mode),
        group_size=q.group_size,
        ratio=q.ratio,
        backup_mode=nncf.BackupMode.INT8_ASYM,
        **kwargs,
    )


def tile_samples(pixels: list[np.ndarray]) -> list[np.ndarray]:
    """Every image's tiles as separate one-tile calibration samples.

    NNCF's statistics passes keep every activation of the sample in flight: a 5-tile LLaVA-NeXT image at
    once took CLIP-L's PTQ to 9.1 GiB; one tile at a time needs a fifth of that for the same tiles.
    """
    return [image[i : i + 1] for image in pixels for i in range(image.shape[0])]


def compress_vision(model, mode: str, pixels: list[np.ndarray] | None = None):
    import nncf

    if mode == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    params = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=SMOOTH_QUANT_ALPHA)
    )
    samples = tile_samples(pixels)
    return nncf.quantize(
        model,
        nncf.Dataset(samples),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(samples),
        advanced_parameters=params,
    )


# ---------------------------------------------------------------- driver


def _load_info(export_dir: Path) -> layout.ExportInfo:
    """The export's record, or a new one (exported elsewhere, e.g. by optimum-intel: none to read)."""
    from llava_ov.runtime.export import ExportDir

    try:
        return ExportDir(export_dir).record() or layout.ExportInfo(source=str(export_dir))
    except TypeError:  # a record of another shape
        return layout.ExportInfo(source=str(export_dir))


def _tmp_name(path: Path) -> Path:
    """openvino_x.xml -> .openvino_x.tmp-PID.xml (its .bin follows the .xml name)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def _stage_copy(src: Path, out: Path, skip: set[str], overwrite: bool) -> Path:
    """A temporary sibling of `out` holding every file of `src` except `skip`."""
    stage = staging_dir(out, overwrite)
    skip_files = skip | {Path(name).with_suffix(".bin").name for name in skip}
    try:
        shutil.copytree(src, stage, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if Path(d) == src and n in skip_files])  # fmt: skip
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def _keep_float_vision(src: Path, stage: Path) -> list[Path]:
    """Copy the float vision encoder beside the INT8-PTQ one: faster where the CPU lacks int8 units."""
    out = []
    for name in (layout.VISION_MODEL, str(Path(layout.VISION_MODEL).with_suffix(".bin"))):
        target = stage / name.replace(Path(layout.VISION_MODEL).stem, Path(layout.VISION_FLOAT_MODEL).stem)
        shutil.copy2(src / name, target)
        out.append(target)
    return out


def _quiet_rich_console():
    """rich's shared console (NNCF's progress bars draw on it), silenced; and whether it was quiet before."""
    import rich

    console = rich.get_console()
    was_quiet, console.quiet = console.quiet, True
    return console, was_quiet


def check_compress_resources(src: Path, out: Path, plan: dict[str, str], q: QuantConfig, in_place: bool) -> None:
    """Refuse a compression that cannot fit this machine's memory or disk, before reading any model."""
    from llava_ov.exporting.resources import check, compress_need

    lm_bytes = (src / layout.LANGUAGE_MODEL).with_suffix(".bin").stat().st_size if "language" in plan else 0
    # everything else is written too: copied, or (vision, text embeddings) compressed and PTQ's float copy kept
    other = sum(f.stat().st_size for f in src.iterdir() if f.is_file()) - lm_bytes
    need = compress_need(
        lm_bytes, other, q.lm_mode if "language" in plan else "none", out,
        awq_samples=q.calib_samples if q.awq else 0,
        ptq_images=q.vision_calib_images if q.vision_mode == "int8_ptq" else 0, in_place=in_place,
    )  # fmt: skip
    check(need)


def compress_export(
    src_dir: str | Path,
    out_dir: str | Path | None = None,
    quant: QuantConfig | None = None,
    *,
    weight_format: str | None = None,
    in_place: bool = False,
    calibration: Any = None,
    progress: bool = True,
    overwrite: bool = False,
    check_resources: bool = True,
) -> Path:
    """Compress the IRs of export `src_dir` into `out_dir` (or in place); returns the output dir.

    `weight_format` "int4"/"int8" is a shortcut for the LM mode (see resolve_config).
    Out of place, every other file (configs, tokenizers, untouched IRs, export_info.json)
    is copied and the result appears at `out_dir` only when complete (an existing non-empty
    `out_dir` needs overwrite=True).  In place (`in_place=True`, out_dir None or == src_dir)
    the new IRs and export_info.json are written under temporary names and renamed over the
    old ones only after every part succeeded.  `calibration`: see the module docstring.
    Raises LlavaOvError, before any heavy work, for bad settings: unknown mode, a group size
    that does not divide the LM's input channels, an empty calibration folder, a part that is
    already compressed.
    """
    try:
        import nncf
        from nncf.common.logging import nncf_logger
    except ImportError:
        raise LlavaOvError("compression needs NNCF: pip install 'llava-ov[convert]' (or pip install nncf)") from None
    import openvino as ov

    src = Path(src_dir).expanduser()
    out = src if out_dir is None else Path(out_dir).expanduser()
    q = resolve_config(quant, weight_format)
    if not (src / layout.LANGUAGE_MODEL).is_file():
        raise ModelNotFoundError(f"{src} is not an export directory (no {layout.LANGUAGE_MODEL})")
    same = out.resolve() == src.resolve()
    if same and not in_place:
        raise LlavaOvError(f"{out} is the source export; pass in_place=True to overwrite it")
    if in_place and not same:
        raise LlavaOvError("in_place=True compresses src_dir itself; leave out_dir out or set it to src_dir")
    todo = {"language": q.lm_mode != "none", "vision": q.vision_mode != "none"}
    todo["text_embeddings"] = todo["language"] and q.text_embeddings_int8
    plan = {part: layout.MODEL_PARTS[part] for part in PART_LABELS if todo[part]}
    if not plan:
        raise LlavaOvError("nothing to compress: lm_mode and vision_mode are both 'none'")

    if check_resources:
        check_compress_resources(src, out, plan, q, in_place)
    core = ov.Core()
    models = {part: core.read_model(str(src / name)) for part, name in plan.items()}  # weights memory-mapped
    before = {part: weight_stats(model) for part, model in models.items()}
    for part, stats in before.items():
        done = [t for t in stats["weights"] if t in _INT_TYPES] or (["FakeQuantize"] if stats["fake_quantize"] else [])
        if done:
            raise LlavaOvError(f"{plan[part]} is already compressed ({', '.join(done)}); compress the fp16/fp32 export")
    if q.lm_mode.startswith("int4"):
        check_group_size(models["language"], q.group_size)
    counts = [q.vision_calib_images] * (q.vision_mode == "int8_ptq") + [q.calib_samples] * q.awq
    calib = calibration_images(calibration, max(counts)) if counts else None

    info = _load_info(src)
    phases = Phases("compress", len(plan) + bool(counts) + q.awq, stream=sys.stderr, enabled=progress)
    stage = src if in_place else _stage_copy(src, out, set(plan.values()), overwrite)
    written: list[Path] = []
    if q.vision_mode == "int8_ptq":
        written += _keep_float_vision(src, stage)
    level = nncf_logger.level
    nncf.set_log_level(logging.WARNING)  # our phases report progress; NNCF's INFO tables are noise
    console, was_quiet = _quiet_rich_console()  # and so are its progress bars
    try:
        record = _settings_record(q, weight_format, info)
        pixels = lm_samples = None
        if calib is not None:
            with phases.phase(f"preprocessing {len(calib.images)} calibration images ({calib.source})"):
                pixels = pixel_values_for(src, calib.images)
            record["calibration"] = {"source": calib.source, "images": len(calib.images), "augmented": calib.augmented,
                                     "tiles": int(sum(p.shape[0] for p in pixels))}  # fmt: skip
        if q.awq:
            with phases.phase(f"building {q.calib_samples} language-model calibration prompts"):
                lm_samples = language_calibration(src, pixels, calib.captions, q.calib_samples)
            record["calibration"]["language_samples"] = len(lm_samples)
            record["calibration"]["language_tokens"] = [int(s["inputs_embeds"].shape[1]) for s in lm_samples]
        for part, name in plan.items():
            model = models.pop(part)
            precision = {"language": q.lm_precision, "text_embeddings": "int8_asym"}.get(part)
            precision = precision or ("int8_ptq" if q.vision_mode == "int8_ptq" else "int8_asym")
            with phases.phase(f"compressing {PART_LABELS[part]} ({precision})"):
                if part == "language":
                    compressed = compress_language(model, q, lm_samples)
                elif part == "text_embeddings":
                    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
                else:
                    compressed = compress_vision(model, q.vision_mode, pixels)
                target = _tmp_name(stage / name) if in_place else stage / name
                written.append(target)
                fp16 = "f16" in before[part]["weights"]  # leftover float weights keep their precision
                ov.save_model(compressed, str(target), compress_to_fp16=fp16)
                after = weight_stats(compressed)
                awq = awq_layers(compressed) if part == "language" and q.awq else None
                del model, compressed
                gc.collect()
            entry = info.parts.setdefault(part, {"file": name})
            record["parts"][part] = {
                "from": entry.get("precision", "fp16" if fp16 else "fp32"),
                "weight_bytes_before": before[part]["weight_bytes"],
                "weight_bytes_after": after["weight_bytes"],
                "weight_share": type_share(after),
                **({"awq_layers": awq} if awq is not None else {}),
            }
            if part == "vision" and q.vision_mode == "int8_ptq":
                entry["float_file"] = layout.VISION_FLOAT_MODEL
                entry["float_precision"] = entry.get("precision", "fp16" if fp16 else "fp32")
            entry["precision"] = precision
            if awq == 0:
                phases.note("AWQ had no INT4 layer to correct (NNCF matches only the MLP down projections, which "
                            "stayed INT8 at this ratio; ratio=1.0 makes them INT4); scale estimation still applied")
        info.compression = {**info.compression, **record}
        info.timings_s.update({f"compress: {k}": round(v, 2) for k, v in phases.timings.items()})
        if in_place:
            written.append(_tmp_name(stage / layout.EXPORT_INFO))
            written[-1].write_text(json.dumps(asdict(info), indent=2) + "\n")
            for name in plan.values():  # every part is written: now swap them in (.bin before .xml)
                tmp = _tmp_name(stage / name)
                os.replace(tmp.with_suffix(".bin"), (stage / name).with_suffix(".bin"))
                os.replace(tmp, stage / name)
            os.replace(written[-1], stage / layout.EXPORT_INFO)
        else:
            info.save(stage)
            publish(stage, out)
    except BaseException:
        for path in written if in_place else []:
            path.unlink(missing_ok=True)
            path.with_suffix(".bin").unlink(missing_ok=True)
        if not in_place:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        nncf.set_log_level(level)
        console.quiet = was_quiet
    return out


def _settings_record(q: QuantConfig, weight_format: str | None, info: layout.ExportInfo) -> dict[str, Any]:
    """Every setting for export_info.json["compression"] (merged over what convert wrote)."""
    old = info.compression
    lm = weight_format or (q.lm_mode if q.lm_mode != "none" else old.get("weight_format"))
    ptq = q.vision_mode == "int8_ptq"
    return {
        "weight_format": lm,
        "float_weights": old.get("float_weights", old.get("weight_format")),  # what convert stored floats as
        **asdict(q),
        "backup_mode": "int8_asym",
        "scale_estimation": q.awq,
        "sensitivity_metric": "max_activation_variance" if q.awq else "weight_quantization_error",
        **({"vision_model_type": "transformer", "vision_smooth_quant_alpha_matmul": SMOOTH_QUANT_ALPHA} if ptq else {}),
        **layout.library_versions(("nncf", "openvino")),
        "parts": {},
    }
