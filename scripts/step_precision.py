#!/usr/bin/env python
"""Time of one paged forward by rows in the step, per OpenVINO property set (not part of the tests).

    python scripts/step_precision.py EXPORT ['{"INFERENCE_PRECISION_HINT": "f32"}' ...]

For each property set (JSON; none: the plugin's defaults) it loads the paged language model,
prefills 8 sequences of --context tokens, then times decode steps of 1/2/4/8/16/32/64 rows (each
row a sequence at that context) and prefill chunks of 256 and 1,024 tokens after 1,000 cached,
median of --runs after 3 warm-ups. Used for docs/speed.md (which precision suits which step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from llava_ov.tools.measure import machine_info
from llava_ov.runtime.model import ExportedModel
from llava_ov.runtime.settings import LoadSettings
from llava_ov.runtime.engine.paged import ForwardBatch


def median_ms(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(export: str, props: dict, context: int, runs: int) -> dict:
    model = ExportedModel(export, LoadSettings(properties=props, cache_dir=None))
    lm, rng = model.paged, np.random.default_rng(0)
    per_seq = -(-(context + 1100) // lm.block_size)
    lm.allocate(8 * per_seq + 1)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(8)]

    def forward(rows: list[int], past: int, n: int) -> None:
        ids = rng.integers(10, 30000, len(rows) * n)
        positions = np.concatenate([np.arange(past, past + n)] * len(rows))
        lm.forward(ForwardBatch(ids, positions, [past] * len(rows), [n] * len(rows), [tables[r] for r in rows],
                                [(i + 1) * n - 1 for i in range(len(rows))]))  # fmt: skip

    for seq in range(8):
        for start in range(0, context, 500):
            forward([seq], start, min(500, context - start))
    out = {"precision": str(model._compiled["language"].get_property("INFERENCE_PRECISION_HINT")),
           "kv_cache": str(model._compiled["language"].get_property("KV_CACHE_PRECISION")), "decode_ms": {}}  # fmt: skip
    for rows in (1, 2, 4, 8, 16, 32, 64):
        seqs = [i % 8 for i in range(rows)]  # beyond 8 rows, sequences repeat (same reads, more rows)
        out["decode_ms"][rows] = round(median_ms(lambda: forward(seqs, context, 1), runs), 1)
    out["prefill_ms"] = {n: round(median_ms(lambda: forward([0], 1000, n), max(3, runs // 2)), 0) for n in (256, 1024)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export")
    p.add_argument("properties", nargs="*", help="JSON objects of OpenVINO properties (default: one, {})")
    p.add_argument("--context", type=int, default=1500)
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    report = {"machine": machine_info(), "context": args.context, "results": []}
    for text in args.properties or ["{}"]:
        result = {"properties": json.loads(text), **measure(args.export, json.loads(text), args.context, args.runs)}
        print(json.dumps(result), flush=True)
        report["results"].append(result)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
