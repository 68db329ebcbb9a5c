"""Compile-time choices decided by measuring this machine, not by a rule tuned on another CPU.

Decode steps may run on a second, f32 compilation of the language model (dynamically quantized
kernels on int8 units). Whether that beats the plugin's default precision depends on the CPU: it
paid on an Intel Xeon with AMX (TPOT 1.34x) and cost 4-8 % on an AMD EPYC Zen 4 (issue 30). So
`decode_precision="auto"` times a few decode steps of both compilations on the loaded model at
first load (the same forward the engine runs: one token after `MEASURE_CONTEXT` cached positions),
keeps the f32 one only when it is faster by more than `MARGIN`, and remembers the decision per
CPU model, OpenVINO version, language-model file and thread count in `decode-choices.json` in the
compiled-model cache folder, so later loads skip the measurement.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llava_ov.runtime.engine.paged import ForwardBatch, PagedLanguageModel

log = logging.getLogger("llava_ov.runtime.decode_choice")

CHOICES_FILE = "decode-choices.json"
MEASURE_CONTEXT = 1024  # cached positions before the timed token (a short image prompt)
MEASURE_STEPS, WARMUP_STEPS = 6, 2  # per compilation, interleaved
MARGIN = 0.03  # the f32 compilation must be this much faster: it costs a second copy of the weights


@dataclass
class Measured:
    """Median seconds per decode step of the default compilation and of the f32 one."""

    default_s: float
    f32_s: float
    cached: bool = False  # read from the choices file, not measured now

    @property
    def f32_pays(self) -> bool:
        return self.f32_s < (1 - MARGIN) * self.default_s

    def why(self, default_name: str) -> str:
        chosen = "f32 decode steps" if self.f32_pays else "same as prefill"
        source = "remembered for this CPU, OpenVINO and export" if self.cached else "measured at load"
        return (f"{chosen}: {self.f32_s * 1e3:.2f} ms per step at f32 vs {self.default_s * 1e3:.2f} ms at "
                f"{default_name} ({source})")  # fmt: skip


def time_decode_steps(main: Any, f32: Any, context: int = MEASURE_CONTEXT) -> Measured:
    """Median time of one decode step (one token after `context` cached positions) on each compilation,
    interleaved. Uses a pool of its own (freed after): the engine's is allocated later."""
    lm = PagedLanguageModel(main, f32)
    blocks = -(-(context + 1) // lm.block_size)
    lm.allocate(blocks)
    step = ForwardBatch(np.zeros(1, np.int64), np.array([context], np.int64), [context], [1], [list(range(blocks))], [0])
    times: dict[str, list[float]] = {"main": [], "f32": []}
    for i in range(WARMUP_STEPS + MEASURE_STEPS):
        for name, request in (("main", lm.request), ("f32", lm.decode_request)):
            started = time.perf_counter()
            lm._run(request, step, None)
            if i >= WARMUP_STEPS:
                times[name].append(time.perf_counter() - started)
    return Measured(statistics.median(times["main"]), statistics.median(times["f32"]))


class DecodeChoices:
    """The decisions made on this machine, by key (a JSON file; None: nothing is remembered)."""

    def __init__(self, folder: Path | None):
        self.path = folder / CHOICES_FILE if folder is not None else None

    def get(self, key: str) -> Measured | None:
        record = self._read().get(key)
        if not isinstance(record, dict):
            return None
        try:
            return Measured(float(record["default_s"]), float(record["f32_s"]), cached=True)
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, measured: Measured) -> None:
        if self.path is None:
            return
        records = self._read()
        when = time.strftime("%Y-%m-%dT%H:%M:%S")
        records[key] = {"default_s": measured.default_s, "f32_s": measured.f32_s, "at": when}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(records, indent=1, sort_keys=True))
            temporary.replace(self.path)  # atomic: a reader never sees half a file
        except OSError as exc:  # a read-only cache folder: the next load measures again
            log.warning("cannot remember the decode-precision choice in %s: %s", self.path, exc)

    def _read(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            records = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return records if isinstance(records, dict) else {}


def choice_key(cpu: str, openvino: str, weights: Path, threads: Any, kv_precision: Any) -> str:
    """What a decision depends on: the CPU model, OpenVINO, the language model's file and how it runs."""
    stat = weights.stat() if weights.exists() else None
    file = f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}" if stat else str(weights)
    return f"{cpu}|openvino {openvino}|{file}|threads {threads}|kv {kv_precision}"
