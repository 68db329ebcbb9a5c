"""`llava-ov bench MODEL --video FILE --frames 8,16,32`: TTFT and memory against the frames sampled.

For each frame count, fresh runs (caches cleared) of one video prompt: decoding the sampled frames
(preprocessing included), the vision pass over them, the language model's prefill, TTFT, TPOT, and
the process's peak RSS above what it held before the first run of that count. With `--compare
genai`, openvino_genai's VLMPipeline gets the same frames (decoded by us) on the same export, with the
SDPA backend by default (its PA backend keeps the prompt's KV between runs: a rerun would not prefill).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_ov.runtime.settings import LoadSettings
from llava_ov.tools.measure import RssSampler, Stat, current_rss, machine_info, save_seconds_plot, summarize

DEFAULT_FRAMES = (8, 16, 32)


@dataclass
class VideoBenchOptions:
    model: Path
    video: Path
    frames: tuple[int, ...] = DEFAULT_FRAMES
    prompt: str = "Describe what happens in this video."
    max_new_tokens: int = 32
    runs: int = 3
    warmup: int = 1
    load: LoadSettings = field(default_factory=LoadSettings)
    compare: tuple[str, ...] = ()
    genai_backend: str = "SDPA"  # SDPA: no prefix cache, so every genai run prefills its whole prompt as ours do


def run_video_bench(opts: VideoBenchOptions, log=print) -> dict[str, Any]:
    """Per frame count: timings (mean ± std over `runs`) and peak RSS growth; ours, and genai if asked."""
    from llava_ov.runtime.pipeline import Pipeline

    pipe = Pipeline(opts.model, opts.load)
    if not pipe.model.family.takes_video:
        from llava_ov.runtime.families import no_video

        raise no_video(pipe.model.family.architecture)
    genai = _genai(opts) if "genai" in opts.compare else None
    levels = {}
    for frames in opts.frames:
        levels[str(frames)] = {"ours": _ours_level(pipe, opts, frames, log)}
        if genai is not None:
            levels[str(frames)]["genai"] = _genai_level(genai, pipe, opts, frames, log)
    return {"machine": machine_info(), "video": str(opts.video), "prompt": opts.prompt,
            "max_new_tokens": opts.max_new_tokens, "runs": opts.runs, "levels": levels}  # fmt: skip


def _ours_level(pipe, opts: VideoBenchOptions, frames: int, log) -> dict[str, Any]:
    from llava_ov.runtime.generate import GenerationConfig

    config = GenerationConfig(max_new_tokens=opts.max_new_tokens, ignore_eos=True, num_frames=frames)
    results, before = [], current_rss()
    with RssSampler() as sampler:
        for i in range(opts.warmup + opts.runs):
            pipe.clear_caches()  # first-turn numbers: no KV reuse, no cached frame features
            result = pipe.generate(opts.prompt, config=config, videos=[opts.video])
            if i >= opts.warmup:
                results.append(result)
    log(f"[bench] {frames} frames: done")
    t = [r.timings for r in results]
    return {
        "frames": results[0].video_frames, "video_tokens": results[0].video_tokens,
        "prompt_tokens": results[0].prompt_tokens,
        "decode_frames_s": summarize([x.preprocess_s for x in t]).__dict__,  # frame decoding + preprocessing
        "vision_s": summarize([x.vision_s for x in t]).__dict__,
        "prefill_s": summarize([x.prefill_s for x in t]).__dict__,
        "ttft_s": summarize([x.ttft_s for x in t]).__dict__,
        "tpot_s": summarize([x.tpot_s for x in t]).__dict__,
        "peak_rss_growth_mb": (sampler.peak - before) / 2**20,
    }  # fmt: skip


def _genai(opts: VideoBenchOptions):
    import openvino_genai

    return openvino_genai.VLMPipeline(str(opts.model), opts.load.device, ATTENTION_BACKEND=opts.genai_backend,
                                      **opts.load.properties)  # fmt: skip


def _genai_level(genai, pipe, opts: VideoBenchOptions, frames: int, log) -> dict[str, Any]:
    """genai on the same frames (decoded and sampled by us, handed over as uint8 [F, H, W, 3])."""
    import numpy as np
    import openvino as ov
    import openvino_genai

    from llava_ov.runtime.video import open_video, sample_indices

    with open_video(opts.video) as video:
        picked = sample_indices(video.info.frames, num_frames=frames)
        tensor = ov.Tensor(np.stack([np.asarray(f) for f in video.frames(picked)]))
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.ignore_eos = opts.max_new_tokens, True
    ttft, tpot = [], []
    for i in range(opts.warmup + opts.runs):
        start, stamps = time.perf_counter(), []
        genai.start_chat()  # a fresh history each run
        genai.generate(opts.prompt, videos=[tensor], generation_config=config,
                       streamer=lambda _: stamps.append(time.perf_counter()) or False)  # fmt: skip
        genai.finish_chat()
        if i >= opts.warmup and len(stamps) > 1:
            ttft.append(stamps[0] - start)
            tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    log(f"[bench] genai {frames} frames: done")
    return {"frames": len(picked), "ttft_s": summarize(ttft).__dict__, "tpot_s": summarize(tpot).__dict__}


def format_video_report(report: dict[str, Any]) -> str:
    """One markdown table: a row per frame count (and engine)."""
    rows = ["| frames | engine | video tokens | decode+preprocess ms | vision ms | LM prefill ms | TTFT ms | TPOT ms | "
            "peak RSS growth MB |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for frames, engines in report["levels"].items():
        for name, e in engines.items():
            cells = [frames, name, str(e.get("video_tokens", "–"))]
            cells += [Stat(**e[k]).fmt(1e3) if k in e else "–" for k in ("decode_frames_s", "vision_s", "prefill_s")]
            cells += [Stat(**e["ttft_s"]).fmt(1e3), Stat(**e["tpot_s"]).fmt(1e3, 2)]
            cells.append(f"{e['peak_rss_growth_mb']:.0f}" if "peak_rss_growth_mb" in e else "–")
            rows.append("| " + " | ".join(cells) + " |")
    m = report["machine"]
    return "\n".join(rows) + f"\n\n{m.get('cpu')} ({m.get('cores')} cores; {', '.join(m.get('cpu_flags') or [])})"


def plot_video(report: dict[str, Any], path: Path) -> None:
    """TTFT and its parts against the number of frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    x = [int(f) for f in levels]
    fig, ax = plt.subplots(figsize=(7, 4))
    parts = {"TTFT": "ttft_s", "vision": "vision_s", "LM prefill": "prefill_s", "decode + preprocess": "decode_frames_s"}
    for label, key in parts.items():
        stats = [levels[f]["ours"][key] for f in levels]
        ax.errorbar(x, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o", capsize=3, label=label)
    if all("genai" in levels[f] for f in levels):
        stats = [levels[f]["genai"]["ttft_s"] for f in levels]
        ax.errorbar(x, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="s", capsize=3,
                    linestyle="--", label="genai TTFT")  # fmt: skip
    ax.set_xticks(x)
    save_seconds_plot(fig, ax, path, "frames sampled", "Video TTFT vs frames", report["machine"])
