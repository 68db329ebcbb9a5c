#!/usr/bin/env python
"""Quality of each compression setting against the fp16 export: a markdown table (+ JSON).

Takes an fp16 export (`--export DIR`) or builds the tiny random-weight
LLaVA-NeXT model (`--tiny`: the test-suite's scaled-down config, converted to
fp16), compresses copies of it with `llava_ov.exporting.quantize.compress_export`:

    int8        LM INT8_ASYM per channel (+ INT8 text embeddings)
    int4        LM INT4_SYM g64 r0.6, INT8 backup (+ INT8 text embeddings)
    int4_awq    the same + AWQ and scale estimation (data-aware)
    vision_ptq  vision encoder INT8 PTQ (weights + activations), LM unchanged
    (optional: int4_r1 and int4_r1_awq - ratio 1.0, where AWQ has layers to act on)

and runs `llava_ov.tools.evaluate.evaluate` for each against the fp16 reference, under
each requested runtime ("f32": INFERENCE_PRECISION_HINT and KV_CACHE_PRECISION
pinned to f32, so only the weights differ; "default": the CPU plugin's own
settings).  With both runtimes it also compares the fp16 reference under the
defaults with itself under f32: the runtime's own share of the error.

Calibration uses the scikit-image photographs that are NOT the evaluation images
(the examples/ photos are re-encoded chelsea, coffee, astronaut and rocket), so
the vision PTQ is not measured on its own calibration data.

    python scripts/quality_table.py --tiny --work /tmp/quality-tiny --markdown q.md --json q.json
    python scripts/quality_table.py --export EXPORT_FP16 --work /tmp/q --images examples/cat.jpg \\
        --prompts-count 1 --max-new-tokens 16 --runtime default --calib-images 8 --calib-samples 4
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from llava_ov.common import layout
from llava_ov.tools.evaluate import DEFAULT_PROMPTS, evaluate, example_images
from llava_ov.runtime.settings import F32_PROPERTIES
from llava_ov.exporting.calibration import SKIMAGE_PHOTOS
from llava_ov.exporting.quantize import QuantConfig, compress_export

EVAL_SOURCES = {"chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"}  # what examples/ holds
RUNTIMES = {"f32": dict(F32_PROPERTIES), "default": {}}


def variants(calib_images: int, calib_samples: int) -> dict[str, tuple[str, QuantConfig]]:
    """name -> (label, QuantConfig)."""
    awq = dict(awq=True, calib_samples=calib_samples)
    return {
        "int8": ("LM INT8 (per channel)", QuantConfig(lm_mode="int8")),
        "int4": ("LM INT4_SYM g64 r0.6", QuantConfig(lm_mode="int4_sym", group_size=64, ratio=0.6)),
        "int4_awq": ("LM INT4_SYM g64 r0.6 + AWQ/SE", QuantConfig(lm_mode="int4_sym", group_size=64, ratio=0.6, **awq)),
        "int4_r1": ("LM INT4_SYM g64 r1.0", QuantConfig(lm_mode="int4_sym", group_size=64, ratio=1.0)),
        "int4_r1_awq": ("LM INT4_SYM g64 r1.0 + AWQ/SE",
                        QuantConfig(lm_mode="int4_sym", group_size=64, ratio=1.0, **awq)),
        "vision_ptq": ("vision INT8 PTQ (LM fp16)",
                       QuantConfig(lm_mode="none", vision_mode="int8_ptq", vision_calib_images=calib_images)),
    }  # fmt: skip


def calibration_photos() -> list[Path]:
    """scikit-image photographs other than the evaluation images."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [folder / name for name in SKIMAGE_PHOTOS if name not in EVAL_SOURCES and (folder / name).exists()]


def build_tiny(work: Path) -> Path:
    """The tiny random-weight LLaVA-NeXT checkpoint (as in the tests), converted to fp16."""
    from llava_ov.exporting.convert import ConvertOptions, convert
    from llava_ov.exporting.random_models import RandomModelSpec, build_random_checkpoint

    ckpt, export = work / "tiny-ckpt", work / "tiny-fp16"
    if not (export / layout.LANGUAGE_MODEL).exists():
        build_random_checkpoint(RandomModelSpec("llava-v1.6-mistral-7b-hf"), ckpt)
        convert(str(ckpt), export, ConvertOptions(weight_format="fp16", overwrite=True, show_progress=False))
    return export


def compress_all(ref: Path, work: Path, names: list[str], table: dict, calib: list[Path]) -> dict[str, dict]:
    """Compressed copies (reused when already there), with what each took."""
    out = {}
    for name in names:
        label, quant = table[name]
        target = work / name
        if not (target / layout.EXPORT_INFO).exists():
            log(f"== compressing {name}: {label}")
            compress_export(ref, target, quant, calibration=calib, overwrite=True)
        info = json.loads((target / layout.EXPORT_INFO).read_text())
        out[name] = {
            "label": label, "dir": str(target),
            "compress_s": round(sum(v for k, v in info["timings_s"].items() if k.startswith("compress:")), 1),
            "precision": {p: e.get("precision") for p, e in info["parts"].items()},
            "sizes_mb": part_sizes(target),
            "awq_layers": info["compression"]["parts"].get("language", {}).get("awq_layers"),
            "calibration": info["compression"].get("calibration"),
        }  # fmt: skip
    return out


def part_sizes(export: Path) -> dict[str, float]:
    """Size of each part's .bin in MB."""
    return {part: round((export / name).with_suffix(".bin").stat().st_size / 1e6, 2)
            for part, name in layout.MODEL_PARTS.items()}  # fmt: skip


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_all(ref: Path, built: dict, runtimes: list[str], eval_args: dict) -> list[dict]:
    """evaluate() of every variant under every runtime (one reference Pipeline per runtime)."""
    from llava_ov.runtime.pipeline import Pipeline

    rows, refs = [], {}
    for runtime in runtimes:
        refs[runtime] = Pipeline(ref, properties=RUNTIMES[runtime], cache_dir=None)
        for name, meta in built.items():
            log(f"== evaluating {name} ({runtime})")
            report = evaluate(refs[runtime], meta["dir"], properties=RUNTIMES[runtime], cache_dir=None, log=log,
                              **eval_args)  # fmt: skip
            rows.append({"variant": name, "runtime": runtime, **meta, "report": report})
    if {"f32", "default"} <= set(refs):
        log("== evaluating the runtime alone: fp16 under plugin defaults vs under f32")
        report = evaluate(refs["f32"], refs["default"], log=log, **eval_args)
        meta = {"label": "fp16 weights, plugin-default runtime vs f32 runtime", "dir": str(ref),
                "precision": report["reference"]["precision"], "sizes_mb": part_sizes(ref), "awq_layers": None}
        rows.append({"variant": "runtime_only", "runtime": "default vs f32", **meta, "report": report})  # fmt: skip
    return rows


def markdown(rows: list[dict], ref_sizes: dict[str, float], title: str) -> str:
    """The quality table, then the per-image vision cosines of the PTQ variant."""
    settings = rows[0]["report"]["settings"]
    lines = [
        f"### {title}", "",
        f"Reference: the fp16 export (LM {mb(ref_sizes['language'])} MB, vision {mb(ref_sizes['vision'])} MB). "
        f"{len(settings['images'])} images x {len(settings['prompts'])} questions, {settings['max_new_tokens']} "
        "new tokens, greedy. "
        "top-1 and KL: teacher-forced along the reference's greedy answer; prefix: equal leading tokens of the "
        "two free-running greedy answers (mean, and share of the reference's length); similarity: difflib ratio "
        "of the answer texts; vision cosine: packed image features (mean over images / worst token).", "",
        "| variant | runtime | LM MB | vision MB | top-1 agree | KL mean | KL max | identical prefix | "
        "text similarity | vision cosine (mean / worst token) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for row in rows:
        a, s = row["report"]["aggregate"], row["sizes_mb"]
        awq = f" (AWQ layers: {row['awq_layers']})" if row["awq_layers"] is not None else ""
        lines.append(
            f"| {row['label']}{awq} | {row['runtime']} | {mb(s['language'])} | {mb(s['vision'])} | "
            f"{a['top1_agreement']:.3f} | {a['kl_mean']:.2e} | {a['kl_max']:.2e} | "
            f"{a['identical_prefix']:.1f} ({a['identical_prefix_share']:.2f}) | {a['similarity']:.3f} | "
            f"{a['vision_cosine']:.5f} / {a['vision_min_token_cosine']:.4f} |"
        )
    ptq = [r for r in rows if r["variant"] == "vision_ptq"]
    if ptq:
        calib = ptq[0].get("calibration") or {}
        names = ", ".join(p.stem for p in calibration_photos()[: calib.get("images", 0)])
        lines += ["", f"INT8-PTQ vision features vs fp16 features, per example photo (calibrated on "
                  f"{calib.get('images', '?')} other scikit-image photos: {names}):", "",
                  "| image | runtime | image tokens | cosine (flattened) | worst token cosine |",
                  "|---|---|---:|---:|---:|"]  # fmt: skip
        for row in ptq:
            if row is not ptq[0] and row["report"]["vision"] == ptq[0]["report"]["vision"]:
                lines.append(f"| (same under {row['runtime']}) | | | | |")
                continue
            for v in row["report"]["vision"]:
                lines.append(f"| {v['image']} | {row['runtime']} | {v['tokens']} | {v['vision_cosine']:.5f} | "
                             f"{v['vision_min_token_cosine']:.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def mb(value: float) -> str:
    """Megabytes with about three significant digits."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--export", type=Path, help="fp16 export to use as the reference")
    src.add_argument("--tiny", action="store_true", help="build the tiny random-weight LLaVA-NeXT model")
    src.add_argument("--render", type=Path, help="only re-render the markdown of a JSON report written by --json")
    p.add_argument("--work", type=Path, default=None, help="folder for the compressed copies (reused)")
    p.add_argument("--variants", default="int8,int4,int4_awq,vision_ptq", help="comma list (see the docstring)")
    p.add_argument("--runtime", default="f32,default", help="comma list of f32, default")
    p.add_argument("--images", nargs="+", default=None, help="default: the photos in examples/")
    p.add_argument("--prompts-count", type=int, default=len(DEFAULT_PROMPTS), help="first N default questions")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--calib-images", type=int, default=9, help="vision PTQ calibration images")
    p.add_argument("--calib-samples", type=int, default=8, help="AWQ calibration prompts")
    p.add_argument("--title", default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        return emit(markdown(saved["rows"], saved["reference_sizes_mb"], saved["title"]), args.markdown)
    if args.work is None:
        p.error("--work is required")
    args.work.mkdir(parents=True, exist_ok=True)
    ref = build_tiny(args.work) if args.tiny else args.export
    table = variants(args.calib_images, args.calib_samples)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(table)}")
    started = time.perf_counter()
    built = compress_all(ref, args.work, names, table, calibration_photos())
    eval_args = dict(images=args.images or example_images(), prompts=list(DEFAULT_PROMPTS[: args.prompts_count]),
                     max_new_tokens=args.max_new_tokens)  # fmt: skip
    rows = run_all(ref, built, [r for r in args.runtime.split(",") if r], eval_args)
    title = args.title or f"Quality of compressed exports vs fp16 ({ref.name})"
    if args.json:
        machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
        saved = {"title": title, "reference": str(ref), "reference_sizes_mb": part_sizes(ref), "machine": machine,
                 "rows": rows, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        args.json.write_text(json.dumps(saved, indent=2) + "\n")
    return emit(markdown(rows, part_sizes(ref), title), args.markdown)


def emit(text: str, path: Path | None) -> int:
    print(text)
    if path:
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
