"""`llava-ov compress` and `llava-ov evaluate`: thin commands over llava_ov.exporting.quantize and llava_ov.tools.evaluate.

    llava-ov compress EXPORT -o OUT --lm int4_sym --group-size 64 --ratio 0.6 --vision int8_ptq
    llava-ov evaluate EXPORT OUT --json quality.json

Settings are checked by `QuantConfig.validate` and `compress_export` (not by
argparse `choices`), so a bad value is one `error: ...` line with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_ov.errors import LlavaOvError
from llava_ov.runtime.settings import LoadSettings

LM_MODES = "int4_sym | int4_asym | int8 | none"  # mirrors quantize.LM_MODES (kept here: no numpy at import)
VISION_MODES = "none | int8 | int8_ptq"


def register(subparsers) -> None:
    """Add the `compress` and `evaluate` subcommands."""
    p = subparsers.add_parser("compress", help="compress an export with NNCF (INT4/INT8 LM, INT8 vision)")
    p.add_argument("export", help="export directory to compress (fp16/fp32)")
    p.add_argument("-o", "--output", required=True, help="directory for the compressed export")
    p.add_argument("--lm", default="int4_sym", help=f"language model: {LM_MODES} (default int4_sym)")
    p.add_argument("--group-size", type=int, default=64, help="INT4 group size; -1 = per channel (default 64)")
    p.add_argument("--ratio", type=float, default=0.6, help="share of LM weights in INT4, the rest INT8 (default 0.6)")
    p.add_argument("--awq", action="store_true", help="data-aware INT4: AWQ + scale estimation on calibration prompts")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration prompts for --awq (default 32)")
    p.add_argument("--no-text-embeddings-int8", dest="text_embeddings_int8", action="store_false",
                   help="keep the text embeddings in float")  # fmt: skip
    p.add_argument("--vision", default="none", help=f"vision encoder: {VISION_MODES} (default none)")
    p.add_argument("--calib-images", type=int, default=50, help="calibration images for --vision int8_ptq")
    p.add_argument("--calibration", default=None, metavar="FOLDER|DATASET_ID",
                   help="calibration images: a folder, or a Hugging Face dataset id (default: scikit-image photos)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--skip-resource-check", dest="check_resources", action="store_false",
                   help="compress even where the memory/disk estimate says it will not fit")  # fmt: skip
    p.set_defaults(func=cmd_compress)

    p = subparsers.add_parser("evaluate", help="compare a compressed export with its reference (agreement, KL)")
    p.add_argument("reference", help="reference export directory (e.g. fp16)")
    p.add_argument("candidate", help="compressed export directory")
    p.add_argument("--images", nargs="+", default=None, help="image files (default: the photos in examples/)")
    p.add_argument("--prompts", nargs="+", default=None, help="questions asked about every image")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report (every sample) as JSON")
    from llava_ov.tools.evaluate import EVALUATE_SETTINGS

    LoadSettings.add_arguments(p)  # both exports load with these (default: the plugin's own precision)
    p.set_defaults(func=cmd_evaluate, vision_encoder=EVALUATE_SETTINGS.vision_encoder)


def cmd_compress(args: argparse.Namespace) -> int:
    from llava_ov.exporting.quantize import QuantConfig, compress_export

    src, out = Path(args.export).expanduser(), Path(args.output).expanduser()
    quant = QuantConfig(
        lm_mode=args.lm, group_size=args.group_size, ratio=args.ratio, awq=args.awq,
        calib_samples=args.calib_samples, text_embeddings_int8=args.text_embeddings_int8,
        vision_mode=args.vision, vision_calib_images=args.calib_images,
    ).validate()  # fmt: skip
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise LlavaOvError(f"{out} is the source export; choose another output directory")
    done = compress_export(src, out, quant, calibration=args.calibration, overwrite=args.overwrite,
                           check_resources=args.check_resources)
    print(f"compressed {src} -> {done}")
    print_parts(done)
    return 0


def print_parts(export: Path) -> None:
    """One line per compressed part: precision and weight bytes before/after."""
    from llava_ov.runtime.export import ExportDir

    export_dir = ExportDir(export)
    for part, rec in export_dir.info.get("compression", {}).get("parts", {}).items():
        before, after = rec["weight_bytes_before"], rec["weight_bytes_after"]
        precision = export_dir.stored_precision(part)
        print(f"  {part:<16} {precision:<28} weights {before / 1e6:9.2f} MB -> {after / 1e6:9.2f} MB "
              f"({before / max(after, 1):.2f}x)")  # fmt: skip


def cmd_evaluate(args: argparse.Namespace) -> int:
    from llava_ov.tools.evaluate import evaluate, format_table, write_json

    report = evaluate(
        args.reference, args.candidate, images=args.images, prompts=args.prompts,
        max_new_tokens=args.max_new_tokens, settings=LoadSettings.from_args(args),
        log=lambda m: print(m, file=sys.stderr),
    )  # fmt: skip
    print(format_table(report))
    if args.json:
        print(f"wrote {write_json(report, args.json)}", file=sys.stderr)
    return 0
