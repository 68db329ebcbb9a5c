#!/usr/bin/env python
"""Last-position logit drift vs transformers by prompt length, before and after the fp16 fix.

For both families builds a small random checkpoint (tiny widths, 3 decoder layers),
converts it to fp32, then makes each export kind twice:

- before: the language model saved with OpenVINO's plain `compress_to_fp16=True`
  (what llava-ov did before: rotary frequencies stored in fp16), INT8/INT4 compressed from it;
- after:  `llava-ov convert --weight-format fp16` (rotary frequencies kept fp32), INT8/INT4 from it;

and prints, per length, max |export - transformers| of the last position's logits, the
reference using the export's own weight rounding (llava_ov.tools.fidelity).  INT8/INT4 rows show
the IR as run and with its weights decompressed in the graph.  f32 inference and KV cache,
no dynamic quantization.

    python scripts/fidelity_table.py [--work-dir DIR] [--lengths 20,600,2000,4000]
        [--other CHECKPOINT EXPORT LABEL ...]   # e.g. an optimum-intel export of CHECKPOINT
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from llava_ov.common import layout
from llava_ov.exporting.convert import ConvertOptions, convert
from llava_ov.tools.fidelity import logit_drift
from llava_ov.common.hardware import matrix_flags
from llava_ov.exporting.quantize import QuantConfig, compress_export
from llava_ov.exporting.random_models import FAMILY_CONFIGS, RandomModelSpec, build_random_checkpoint

LM_ONLY = QuantConfig(vision_mode="none", text_embeddings_int8=False)


def exports_for(family: str, work: Path) -> dict[tuple[str, str], Path]:
    ckpt = build_random_checkpoint(RandomModelSpec(FAMILY_CONFIGS[family], text_layers=3), work / f"{family}-hf")
    fp32 = convert(str(ckpt), work / f"{family}-fp32", ConvertOptions(weight_format="fp32", show_progress=False))
    before = work / f"{family}-fp16-before"
    shutil.copytree(fp32, before)
    import openvino as ov

    lm = ov.Core().read_model(str(fp32 / layout.LANGUAGE_MODEL))
    ov.save_model(lm, str(before / layout.LANGUAGE_MODEL), compress_to_fp16=True)
    after = convert(str(ckpt), work / f"{family}-fp16-after", ConvertOptions(weight_format="fp16", show_progress=False))
    out = {("fp16", "before"): before, ("fp16", "after"): after}
    for fmt in ("int8", "int4"):
        for when, src in (("before", before), ("after", after)):
            out[fmt, when] = compress_export(src, work / f"{family}-{fmt}-{when}", LM_ONLY, weight_format=fmt,
                                             progress=False)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--lengths", default="20,600,2000,4000")
    parser.add_argument("--other", nargs=3, action="append", default=[], metavar=("CHECKPOINT", "EXPORT", "LABEL"),
                        help="also measure another converter's export of CHECKPOINT (same LM inputs as ours)")
    parser.add_argument("--skip-ours", action="store_true", help="only the --other exports")
    args = parser.parse_args()
    import transformers

    lengths = [int(x) for x in args.lengths.split(",")]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fidelity-"))
    print(f"CPU flags: {' '.join(matrix_flags())}\n")
    print("| family | export | rotary freq. | weights | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
    print("|---|---|---|---|" + "---|" * len(lengths))
    for checkpoint, export, label in args.other:
        model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
        cells = " | ".join(f"{r['max_abs_diff']:.2g}" for r in logit_drift(model, export, lengths))
        print(f"| {model.config.model_type} | {label} | as exported | as stored | {cells} |", flush=True)
    for family in () if args.skip_ours else FAMILY_CONFIGS:
        exports = exports_for(family, work / family)
        arch = getattr(transformers, "LlavaNextForConditionalGeneration" if family == "llava-next"
                       else "LlavaForConditionalGeneration")  # fmt: skip
        model = arch.from_pretrained(work / family / f"{family}-hf").eval()
        for (fmt, when), path in exports.items():
            modes = [False] if fmt == "fp16" else [False, True]
            for decompress in modes:
                rows = logit_drift(model, path, lengths, decompress=decompress)
                how = "decompressed in graph" if decompress else "as stored"
                cells = " | ".join(f"{r['max_abs_diff']:.2g}" for r in rows)
                rotary = "fp16" if when == "before" else "fp32"
                print(f"| {family} | {fmt} | {rotary} | {how} | {cells} |", flush=True)
    if not args.skip_ours:
        print(f"\nlogit span (max |reference|): about {rows[-1]['logit_span']:.0f}")


if __name__ == "__main__":
    main()
