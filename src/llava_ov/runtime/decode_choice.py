"""Compile-time choices decided by measuring this machine, not by a rule tuned on another CPU.

- **Decode precision.** Decode steps may run on a second, f32 compilation of the language model
  (dynamically quantized kernels on int8 units). Whether that beats the plugin's default precision
  depends on the CPU: it paid on an Intel Xeon with AMX (TPOT 1.34x) and cost 4-8 % on an AMD EPYC
  Zen 4 (issue 30). So `decode_precision="auto"` times a few decode steps of both compilations at
  first load (the same forward the engine runs: one token after `MEASURE_CONTEXT` cached positions)
  and keeps the f32 one only when it is faster by more than `MARGIN`.
- **Dynamic-quantization group.** The CPU plugin quantizes activations in groups of 32 by default;
  INT4 weights are stored in groups of their own (64 by default). On the Zen 4 a group equal to the
  weights' made decode 6 % and prefill 15 % faster (end to end, `llava-ov bench`). So
  `dq_group_size="auto"` compiles the language model both ways at first load, times decode steps and
  a short prefill chunk, and keeps the weights' group when it is faster (`GroupMeasured.pays`).

Decisions are remembered per CPU model, OpenVINO version, language-model file, thread count and KV
precision in `decode-choices.json` in the compiled-model cache folder: later loads skip measuring.
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
WARMUP_ROUNDS, MEASURE_ROUNDS, STEPS_PER_ROUND = 1, 4, 3  # decode steps: 8 timed per compilation
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

    def record(self) -> dict[str, Any]:
        return {"default_s": self.default_s, "f32_s": self.f32_s}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Measured:
        return cls(float(record["default_s"]), float(record["f32_s"]), cached=True)

    def why(self, default_name: str) -> str:
        chosen = "f32 decode steps" if self.f32_pays else "same as prefill"
        source = "remembered for this CPU, OpenVINO and export" if self.cached else "measured at load"
        return (f"{chosen}: {self.f32_s * 1e3:.2f} ms per step at f32 vs {self.default_s * 1e3:.2f} ms at "
                f"{default_name} ({source})")  # fmt: skip


def time_decode_steps(main: Any, f32: Any, context: int = MEASURE_CONTEXT) -> Measured:
    """Median time of one decode step (one token after `context` cached positions) on each compilation
    (`f32`: the second one). Uses a pool of its own (freed after): the engine's is allocated later."""
    lm, table = _pair(main, f32, context + 1)
    step = ForwardBatch(np.zeros(1, np.int64), np.array([context], np.int64), [context], [1], table, [0])
    return Measured(*_interleaved(lm, step, WARMUP_ROUNDS, MEASURE_ROUNDS, STEPS_PER_ROUND))


def _pair(main: Any, second: Any, positions: int) -> tuple[PagedLanguageModel, list[list[int]]]:
    """Both compilations over one block pool holding `positions`, and the block table covering it."""
    lm = PagedLanguageModel(main, second)
    blocks = -(-positions // lm.block_size)
    lm.allocate(blocks)
    return lm, [list(range(blocks))]


def _interleaved(lm: PagedLanguageModel, batch: ForwardBatch, warmup: int, rounds: int, runs: int) -> tuple[float, float]:
    """Median seconds of `batch` on the main and the second compilation: rounds taking turns, each running
    it `runs` times in a row and timing all but the first (a switch of compilation costs the first run)."""
    times: dict[str, list[float]] = {"main": [], "second": []}
    for i in range(warmup + rounds):
        for name, request in (("main", lm.request), ("second", lm.decode_request)):
            for run in range(runs):
                started = time.perf_counter()
                lm._run(request, batch, None)
                if i >= warmup and (run or runs == 1):
                    times[name].append(time.perf_counter() - started)
    return statistics.median(times["main"]), statistics.median(times["second"])


@dataclass
class GroupMeasured:
    """Median seconds per decode step and per prefill chunk at the plugin's activation group and at the
    INT4 weights' group (`group`)."""

    default_s: float
    grouped_s: float
    default_prefill_s: float
    grouped_prefill_s: float
    group: int
    cached: bool = False

    @property
    def pays(self) -> bool:
        """Prefill faster by more than MARGIN and decode not clearly slower (2 MARGIN), or decode faster by more
        than MARGIN and prefill not slower by more than MARGIN. A prefill chunk (compute-bound) times far more
        steadily than one decode step (bandwidth-bound: a few of them at load read ±3 % apart on the same
        compilation), and the group changes the same matmul kernels in both."""
        decode, prefill = self.grouped_s / self.default_s, self.grouped_prefill_s / self.default_prefill_s
        if prefill < 1 - MARGIN:
            return decode <= 1 + 2 * MARGIN
        return decode < 1 - MARGIN and prefill <= 1 + MARGIN

    def why(self, default_group: int) -> str:
        chosen = f"the weights' group of {self.group}" if self.pays else f"the plugin's group of {default_group}"
        source = "remembered for this CPU, OpenVINO and export" if self.cached else "measured at load"
        return (f"{chosen}: decode {self.grouped_s * 1e3:.2f} vs {self.default_s * 1e3:.2f} ms per step, prefill "
                f"{self.grouped_prefill_s * 1e3:.0f} vs {self.default_prefill_s * 1e3:.0f} ms per "
                f"{PREFILL_TOKENS}-token chunk ({source})")  # fmt: skip

    def record(self) -> dict[str, Any]:
        return {"default_s": self.default_s, "grouped_s": self.grouped_s, "default_prefill_s": self.default_prefill_s,
                "grouped_prefill_s": self.grouped_prefill_s, "group": self.group}  # fmt: skip

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> GroupMeasured:
        return cls(float(record["default_s"]), float(record["grouped_s"]), float(record["default_prefill_s"]),
                   float(record["grouped_prefill_s"]), int(record["group"]), cached=True)  # fmt: skip


PREFILL_TOKENS = 32  # the prefill chunk timed for the activation-group choice
PREFILL_ROUNDS = 3


def time_group_choice(default: Any, grouped: Any, group: int, context: int = MEASURE_CONTEXT) -> GroupMeasured:
    """Decode steps (as `time_decode_steps`) and a PREFILL_TOKENS chunk on each compilation, over one pool."""
    lm, table = _pair(default, grouped, context + PREFILL_TOKENS)
    step = ForwardBatch(np.zeros(1, np.int64), np.array([context], np.int64), [context], [1], table, [0])
    decode = _interleaved(lm, step, WARMUP_ROUNDS, MEASURE_ROUNDS, STEPS_PER_ROUND)
    chunk = ForwardBatch(np.zeros(PREFILL_TOKENS, np.int64), np.arange(context, context + PREFILL_TOKENS), [context],
                         [PREFILL_TOKENS], table, [PREFILL_TOKENS - 1])  # fmt: skip
    prefill = _interleaved(lm, chunk, 1, PREFILL_ROUNDS, 1)
    return GroupMeasured(*decode, *prefill, group)


def int4_group_size(model: Any) -> int | None:
    """The group size of a model's INT4 weights ([rows, groups, group] u4/i4 constants), or None without any."""
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Constant" and node.get_output_element_type(0).get_type_name() in ("u4", "i4"):
            shape = node.get_output_partial_shape(0)
            if shape.rank.get_length() == 3 and shape[2].is_static:
                return shape[2].get_length()
    return None


class DecodeChoices:
    """The decisions made on this machine, by key (a JSON file; None: nothing is remembered)."""

    def __init__(self, folder: Path | None):
        self.path = folder / CHOICES_FILE if folder is not None else None

    def get(self, key: str, kind: type = Measured) -> Any:
        """The remembered decision of `kind` (Measured, GroupMeasured) under `key`, or None (unknown, damaged)."""
        record = self._read().get(key)
        try:
            return kind.from_record(record) if isinstance(record, dict) else None
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, key: str, measured: Measured | GroupMeasured) -> None:
        if self.path is None:
            return
        records = self._read()
        records[key] = {**measured.record(), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(records, indent=1, sort_keys=True))
            temporary.replace(self.path)  # atomic: a reader never sees half a file
        except OSError as exc:  # a read-only cache folder: the next load measures again
            log.warning("cannot remember a measured choice in %s: %s", self.path, exc)

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
