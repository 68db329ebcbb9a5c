#!/usr/bin/env python
"""Build benchmark models: real llava-v1.6-mistral-7b dimensions, few decoder layers, random weights.

Real weights cannot be downloaded here, so the benchmark models keep every real
dimension (CLIP ViT-L/336 tower with 24 layers, 4096-wide Mistral layers,
32k vocabulary) and only cut the number of decoder layers.  Per-layer costs
scale linearly, so results extrapolate to 32 layers (marked as such in the docs).

Writes into WORK_DIR:
  ckpt-<L>L/                 transformers checkpoint (fp16, like the Hub's)
  ov-<L>L-fp16/              export, fp16 weights
  ov-<L>L-int8/              LM INT8_ASYM weights (+ INT8 text embeddings)
  ov-<L>L-int4/              LM INT4_SYM g64 r0.6 (+ INT8)
  ov-<L>L-fp16-vision-int8/  fp16 LM, INT8 PTQ vision encoder (SmoothQuant, 16 calibration images);
                             first layer count only (the vision encoder does not depend on it)

Usage: python scripts/build_bench_models.py --layers 4 --work-dir artifacts/bench
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def build(layers: int, work: Path, vision_calib: int, vision: bool) -> None:
    from llava_ov.exporting.random_models import RandomModelSpec, build_random_checkpoint

    ckpt = work / f"ckpt-{layers}L"
    if not (ckpt / "config.json").exists():
        print(f"building {ckpt} (real dimensions, {layers} decoder layers, fp16)", flush=True)
        build_random_checkpoint(RandomModelSpec("llava-v1.6-mistral-7b-hf", scale="real", text_layers=layers,
                                                initializer_range=0.02), ckpt, dtype="float16")  # fmt: skip
    cli = [sys.executable, "-m", "llava_ov.cli"]
    fp16 = work / f"ov-{layers}L-fp16"
    if not fp16.exists():
        run(*cli, "convert", str(ckpt), "-o", str(fp16), "--weight-format", "fp16")
    for fmt in ("int8", "int4"):
        out = work / f"ov-{layers}L-{fmt}"
        if not out.exists():
            lm = "int8" if fmt == "int8" else "int4_sym"
            run(*cli, "compress", str(fp16), "-o", str(out), "--lm", lm)
    vision_dir = work / f"ov-{layers}L-fp16-vision-int8"
    if vision and not vision_dir.exists():  # the vision encoder does not depend on the decoder depth
        run(*cli, "compress", str(fp16), "-o", str(vision_dir), "--lm", "none", "--vision", "int8_ptq",
            "--calib-images", str(vision_calib))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4])
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--vision-calib-images", type=int, default=16)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for i, layers in enumerate(args.layers):
        build(layers, args.work_dir, args.vision_calib_images, vision=i == 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
