"""Time the INT8-PTQ vision encoder against the float one kept beside it, on this CPU.

    python scripts/vision_int8_speed.py EXPORT IMAGE [--runs 5]

EXPORT is the output of `llava-ov compress ... --vision int8_ptq`. Both encoders are loaded at
the plugin's default precision and timed interleaved on the same tiles; prints mean ± std per
encoder, their ratio, the CPU's matrix flags, and what `--vision-encoder auto` picks here.
"""

from __future__ import annotations

import argparse
import statistics
import time

from llava_ov.common.hardware import int8_matrix_units, matrix_flags
from llava_ov.runtime.image import ImageConfig, preprocess
from llava_ov.runtime.model import ExportedModel
from llava_ov.runtime.settings import LoadSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("image")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    models = {kind: ExportedModel(args.export, LoadSettings(vision_encoder=kind, cache_dir=None))
              for kind in ("int8", "float")}  # fmt: skip
    mode = models["int8"].family.preprocessing
    pixels = preprocess(args.image, ImageConfig.from_export(args.export), mode).pixel_values
    times: dict[str, list[float]] = {kind: [] for kind in models}
    for i in range(args.runs + 1):
        for kind, model in models.items():
            start = time.perf_counter()
            model.encode_image_tiles(pixels)
            if i:  # the first round warms up
                times[kind].append(time.perf_counter() - start)
    for kind, values in times.items():
        print(f"{kind:5s} vision encoder, {len(pixels)} tiles: {statistics.fmean(values) * 1e3:.0f} ± "
              f"{statistics.stdev(values) * 1e3:.0f} ms")  # fmt: skip
    ratio = statistics.fmean(times["float"]) / statistics.fmean(times["int8"])
    print(f"float / int8: {ratio:.2f}x")
    print(f"cpu flags: {' '.join(matrix_flags())}")
    print(f"int8 matrix units: {', '.join(int8_matrix_units()) or 'none'}")
    auto = ExportedModel(args.export, LoadSettings(cache_dir=None)).vision_choice()[1]
    print(f"--vision-encoder auto here: {auto}")


if __name__ == "__main__":
    main()
