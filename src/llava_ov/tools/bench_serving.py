"""`llava-ov bench --concurrency 1,2,4,8`: many streams at once, as a server sees them.

For each concurrency N, N requests (the same image, different questions) start together and
every generated token is time-stamped. Reported per engine: the *steady decode rate* (tokens
per second summed over streams, counted in the window where all N streams are decoding: after
the last first token, before the first stream ends), the end-to-end output rate (all tokens /
wall time, prefills included), and mean TTFT. Engines, run one after another in one process:
- `ours`: the engine (paged KV cache, continuous batching), N client threads;
- `fifo`: today's one-at-a-time path (the stateful cache), N requests in sequence, as the
  FIFO server ran them — the baseline the engine must beat;
- `genai`: openvino_genai.ContinuousBatchingPipeline on the same export (`--compare genai`),
  prefix caching on like ours (the cache persists across its rounds; ours is cleared per round,
  which only costs ours TTFT, not decode rate).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llava_ov.runtime.settings import LoadSettings

QUESTIONS = (
    "Describe this image in detail.", "What colours stand out?", "What is in the background?",
    "Write a short poem about this picture.", "List the objects you can see.", "What time of day is it?",
    "Who might have taken this photo?", "What happens next in this scene?",
)  # fmt: skip

# engine name -> the load settings it changes (ours loaded another way, timed beside ours)
LOAD_VARIANTS: dict[str, dict[str, str]] = {
    "ours-f32-decode": {"decode_precision": "f32"}, "ours-same-decode": {"decode_precision": "same"},
    "ours-plugin-dq": {"dq_group_size": "plugin"}, "ours-weights-dq": {"dq_group_size": "weights"},
}


def engine_prompt(name: str, export: Path, image: Path, prompt: str) -> str:
    """genai takes the rendered prompt (it adds the newline after <image> itself); others the question."""
    if name != "genai":
        return prompt
    from llava_ov.runtime.pipeline import Message
    from llava_ov.runtime.template import ChatTemplate

    message = Message("user", prompt, [image]).for_template()
    return ChatTemplate.from_export(export).render([message], add_generation_prompt=True).replace("<image>\n", "<image>")


@dataclass
class StreamTimes:
    submitted: float
    tokens: list[float]  # time of every generated token

    @property
    def ttft(self) -> float:
        return self.tokens[0] - self.submitted if self.tokens else float("nan")


def steady_decode_rate(streams: list[StreamTimes]) -> float:
    """Tokens/s summed over streams while all of them decode; one stream at a time: its own rate."""
    start = max(s.tokens[0] for s in streams)
    end = min(s.tokens[-1] for s in streams)
    if end > start:
        return sum(sum(start < t <= end for t in s.tokens) for s in streams) / (end - start)
    gaps = [(s.tokens[-1] - s.tokens[0], len(s.tokens) - 1) for s in streams if len(s.tokens) > 1]
    return sum(n for _, n in gaps) / sum(d for d, _ in gaps)


def summarize_round(streams: list[StreamTimes]) -> dict[str, float]:
    first = min(s.submitted for s in streams)
    last = max(s.tokens[-1] for s in streams)
    return {
        "steady_decode_tokens_per_s": steady_decode_rate(streams),
        "output_tokens_per_s": sum(len(s.tokens) for s in streams) / (last - first),
        "mean_ttft_s": statistics.fmean(s.ttft for s in streams),
    }


class OursServing:
    """The engine (the paged KV cache, whatever --kv-cache says) with every other load setting."""

    def __init__(self, export: Path, settings: LoadSettings, name: str = "ours"):
        from llava_ov.runtime.pipeline import Pipeline

        self.pipe = Pipeline(export, self.settings_for(settings))
        self.name = name

    @staticmethod
    def settings_for(settings: LoadSettings) -> LoadSettings:
        return replace(settings, kv_cache="paged")

    def _one(self, question: str, image: Path, max_new: int, out: list, index: int):
        from llava_ov.runtime.generate import GenerationConfig

        times = StreamTimes(time.perf_counter(), [])
        for chunk in self.pipe.stream(question, [image], GenerationConfig(max_new_tokens=max_new, ignore_eos=True)):
            if chunk.token_ids:
                times.tokens.append(time.perf_counter())
        out[index] = times

    def round(self, n: int, image: Path, max_new: int) -> list[StreamTimes]:
        """n streams submitted together on one event loop, as the server runs them (Pipeline.astream)."""
        self.pipe.clear_caches()

        async def streams() -> list[StreamTimes]:
            return await asyncio.gather(*(self._one_async(QUESTIONS[i % len(QUESTIONS)], image, max_new)
                                          for i in range(n)))  # fmt: skip

        return asyncio.run(streams())

    async def _one_async(self, question: str, image: Path, max_new: int) -> StreamTimes:
        from llava_ov.runtime.generate import GenerationConfig

        config = GenerationConfig(max_new_tokens=max_new, ignore_eos=True)
        times = StreamTimes(time.perf_counter(), [])
        async for chunk in self.pipe.astream(question, [image], config):
            if chunk.token_ids:
                times.tokens.append(time.perf_counter())
        return times

    def close(self) -> None:
        self.pipe.close()


class FifoServing(OursServing):
    """One request at a time on the stateful cache: what the FIFO server did."""

    def __init__(self, export: Path, settings: LoadSettings):
        super().__init__(export, settings, "fifo")

    @staticmethod
    def settings_for(settings: LoadSettings) -> LoadSettings:
        """The stateful cache has one compilation: no decode precision of its own."""
        return replace(settings, kv_cache="stateful", decode_precision="auto")

    def round(self, n: int, image: Path, max_new: int) -> list[StreamTimes]:
        self.pipe.clear_caches()
        submitted = time.perf_counter()
        out: list[Any] = [None] * n
        for i in range(n):
            self._one(QUESTIONS[i % len(QUESTIONS)], image, max_new, out, i)
            out[i].submitted = submitted  # all arrived together; later ones waited in the queue
        return out


class GenaiServing:
    name = "genai"

    def __init__(self, export: Path, device: str, properties: dict, cache_gb: float):
        import openvino_genai as og

        self.og, self.export = og, export
        scheduler = og.SchedulerConfig()
        scheduler.cache_size = max(1, int(round(cache_gb)))
        # On, like ours: the N requests share the image prefix, so both engines prefill it once per round
        # (rounds differ by question only); off, genai prefills the image N times in turn and its
        # first stream finishes before the last one starts, leaving no window where all N decode.
        scheduler.enable_prefix_caching = True
        self.pipe = og.ContinuousBatchingPipeline(str(export), scheduler, device, properties)

    def round(self, n: int, image: Path, max_new: int) -> list[StreamTimes]:
        import numpy as np
        import openvino as ov
        from PIL import Image


        cfg = self.og.GenerationConfig()
        cfg.max_new_tokens, cfg.ignore_eos, cfg.do_sample, cfg.apply_chat_template = max_new, True, False, False
        pixels = ov.Tensor(np.array(Image.open(image).convert("RGB"))[None])
        submitted = time.perf_counter()
        handles = []
        for i in range(n):
            prompt = engine_prompt("genai", self.export, image, QUESTIONS[i % len(QUESTIONS)])
            handles.append(self.pipe.add_request(i, prompt, [pixels], cfg))
        out = [StreamTimes(submitted, []) for _ in range(n)]
        while self.pipe.has_non_finished_requests():
            self.pipe.step()
            now = time.perf_counter()
            for handle, times in zip(handles, out):
                if handle.can_read():
                    for output in handle.read().values():
                        times.tokens.extend([now] * len(output.generated_ids))
        return out

    def close(self) -> None:
        del self.pipe


def run_concurrency(
    export: Path, image: Path, levels: list[int], max_new: int, runs: int, settings: LoadSettings,
    compare: tuple[str, ...] = (), log=print,
) -> dict[str, Any]:  # fmt: skip
    """Every engine at every level, `runs` rounds each after one warm-up round; mean ± std."""

    engines = [OursServing(export, settings), FifoServing(export, settings)]
    if "genai" in compare:
        pool_gb = engines[0].pipe.engine.pool.num_blocks * engines[0].pipe.engine.lm.bytes_per_block / 2**30
        engines.append(GenaiServing(export, settings.device, settings.properties, pool_gb))
    engines += [OursServing(export, replace(settings, **changes), n) for n, changes in LOAD_VARIANTS.items()
                if n in compare]  # fmt: skip
    results: dict[str, dict[str, Any]] = {e.name: {} for e in engines}
    for n in levels:
        rounds: dict[str, list[dict[str, float]]] = {e.name: [] for e in engines}
        for i in range(runs + 1):
            for engine in engines:  # interleaved: drifting machine speed hits every engine alike
                summary = summarize_round(engine.round(n, image, max_new))
                if i:
                    rounds[engine.name].append(summary)
            log(f"[bench] concurrency {n}: round {i + 1}/{runs + 1}{' (warm-up)' if not i else ''} done")
        for name, values in rounds.items():
            results[name][n] = {key: _stat([v[key] for v in values]) for key in values[0]}
    for engine in engines:
        engine.close()
    return {"levels": levels, "max_new_tokens": max_new, "runs": runs, "engines": results,
            "ratios": concurrency_ratios(results, levels)}  # fmt: skip


def _stat(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def concurrency_ratios(results: dict[str, Any], levels: list[int]) -> dict[str, float]:

    key = "steady_decode_tokens_per_s"
    out = {}
    for n in levels:
        for name in ("ours", *LOAD_VARIANTS):
            if name not in results:
                continue
            label = name.replace("-", "_")
            ours = results[name][n][key]["mean"]
            out[f"{label}_over_fifo_at_{n}"] = ours / results["fifo"][n][key]["mean"]
            if "genai" in results:
                out[f"{label}_over_genai_at_{n}"] = ours / results["genai"][n][key]["mean"]
    return out


def format_concurrency(report: dict[str, Any]) -> str:
    rows = ["| engine | streams | steady decode tokens/s | output tokens/s | mean TTFT s |", "|---|---|---|---|---|"]
    for name, levels in report["engines"].items():
        for n, r in levels.items():
            s, o, t = r["steady_decode_tokens_per_s"], r["output_tokens_per_s"], r["mean_ttft_s"]
            rows.append(f"| {name} | {n} | {s['mean']:.2f} ± {s['std']:.2f} | {o['mean']:.2f} ± {o['std']:.2f} | "
                        f"{t['mean']:.2f} ± {t['std']:.2f} |")  # fmt: skip
    rows += [""] + [f"{k}: {v:.2f}" for k, v in report["ratios"].items()]
    return "\n".join(rows)
