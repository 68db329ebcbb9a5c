#!/usr/bin/env python
"""Where a decode step's time goes: OpenVINO's per-node profile of the paged language model (not a test).

    python scripts/decode_profile.py EXPORT --context 1500 --steps 20 [--f32]

Loads the export's paged language model with PERF_COUNT on, fills the KV of one sequence to
--context positions, runs --steps single-token decode steps and sums each node's real time by
layer type (FullyConnected, PagedAttentionExtension, the logits Gather, ...), per step, with its
share. What runs is the decode compilation the engine would use (`decode_precision` as given).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np

from llava_ov.runtime.engine.paged import ForwardBatch
from llava_ov.runtime.model import ExportedModel
from llava_ov.runtime.settings import LoadSettings
from llava_ov.tools.measure import machine_info


def profile(model: ExportedModel, context: int, steps: int) -> dict[str, float]:
    lm = model.paged
    blocks = -(-(context + steps + 1) // lm.block_size)
    lm.allocate(blocks)
    table = [list(range(blocks))]
    chunk = 256
    for start in range(0, context, chunk):  # the prompt's KV, in prefill chunks
        count = min(chunk, context - start)
        lm.forward(ForwardBatch(np.zeros(count, np.int64), np.arange(start, start + count), [start], [count], table,
                                [count - 1]))  # fmt: skip
    request = lm._request_for(1)
    totals: dict[str, float] = defaultdict(float)
    wall = 0.0
    for step in range(steps + 2):
        position = context + step
        batch = ForwardBatch(np.zeros(1, np.int64), np.array([position]), [position], [1], table, [0])
        started = time.perf_counter()
        lm._run(request, batch, None)
        if step >= 2:  # two warm-ups
            wall += time.perf_counter() - started
            for info in request.get_profiling_info():  # the last inference's counters
                totals[info.node_type] += info.real_time.total_seconds()
    out = {kind: seconds / steps for kind, seconds in sorted(totals.items(), key=lambda kv: -kv[1])}
    out["(wall per step)"] = wall / steps
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--context", type=int, default=1500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None)
    LoadSettings.add_arguments(p)
    args = p.parse_args()
    settings = LoadSettings.from_args(args).validate()
    settings = LoadSettings(**{**settings.__dict__, "properties": {**settings.properties, "PERF_COUNT": True}})
    model = ExportedModel(args.model, settings)
    per_step = profile(model, args.context, args.steps)
    wall = per_step["(wall per step)"]
    print(f"decode step at {args.context} cached positions: {wall * 1e3:.2f} ms wall; by layer type:")
    for kind, seconds in per_step.items():
        if kind != "(wall per step)" and seconds * 1e3 >= 0.01:
            print(f"  {kind:32s} {seconds * 1e3:8.3f} ms  {100 * seconds / wall:5.1f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "context": args.context, "per_step_s": per_step,
                       "runtime": model.runtime_info()}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
