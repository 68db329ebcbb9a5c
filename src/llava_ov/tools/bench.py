"""`llava-ov bench`: timing harness shared by the command line and the docs.

Measures load time, image preprocessing, vision encoding, image tokens, TTFT,
per-token decode time (TPOT), tokens/s, RSS and Python overhead for our
Pipeline, and — in the same process, runs interleaved — for
openvino_genai.VLMPipeline on the same export and PyTorch transformers on the
source checkpoint.  Each figure is mean ± standard deviation over the runs
after warm-up.  It also measures sustained memory read bandwidth and reports
decode speed as a share of the bandwidth bound (bytes of weights + KV cache
read per token).
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from llava_ov.runtime.settings import LoadSettings
from llava_ov.tools.measure import RssSampler, Stat, current_rss, machine_info, save_seconds_plot, summarize
from llava_ov.tools.bench_serving import LOAD_VARIANTS, engine_prompt, format_concurrency, run_concurrency

ENGINES = ("ours", "genai", "transformers", *LOAD_VARIANTS)


# ---------------------------------------------------------------- statistics


@dataclass
class RunMetrics:
    preprocess_s: float
    vision_s: float
    ttft_s: float
    tpot_s: float
    image_tokens: int
    prompt_tokens: int
    generated: int
    overhead_share: float | None = None  # ours only: time outside OpenVINO calls / decode time
    grammar_per_token_s: float | None = None  # ours with --json-schema: the grammar's time per token
    tpot_wall_s: float | None = None  # genai only: mean gap between streamed tokens, timed in Python like ours
    prefill_s: float | None = None  # ours only: the language model's prefill (TTFT less image work and queue)
    image_tokens_total: int | None = None  # ours only: before the image-token budget and pruning
    prune_s: float | None = None  # ours only: CDPruner's selection
    proposed: int = 0  # ours only: tokens proposed for verification (jump-forward, prompt lookup)
    accepted: int = 0  # of them, kept

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.tpot_s if self.tpot_s else 0.0


# ---------------------------------------------------------------- bandwidth bound

BANDWIDTH_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <immintrin.h>
#include <omp.h>
/* Sum a buffer with AVX2 loads and four accumulators per thread: memory-bound, not add-bound. */
int main(int argc, char **argv) {
    size_t n = (size_t)atol(argv[1]) * 1024 * 1024 / 32; int reps = atoi(argv[2]);
    __m256i *a = aligned_alloc(64, n * 32);
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) a[i] = _mm256_set1_epi64x(i);
    for (int r = 0; r < reps; r++) {
        double t = omp_get_wtime(); long long total = 0;
        #pragma omp parallel reduction(+:total)
        {
            __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
            #pragma omp for
            for (size_t i = 0; i < n; i += 4) {
                s0 = _mm256_add_epi64(s0, _mm256_load_si256(a + i));
                s1 = _mm256_add_epi64(s1, _mm256_load_si256(a + i + 1));
                s2 = _mm256_add_epi64(s2, _mm256_load_si256(a + i + 2));
                s3 = _mm256_add_epi64(s3, _mm256_load_si256(a + i + 3));
            }
            long long v[4];
            _mm256_storeu_si256((__m256i *)v, _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
            total += v[0] + v[1] + v[2] + v[3];
        }
        t = omp_get_wtime() - t;
        printf("%f\n", n * 32 / t / 1e9);
        fprintf(stderr, "%lld\n", total);
    }
    return 0;
}
"""


def measure_bandwidth(size_mb: int = 1024, repeats: int = 7) -> dict[str, Any]:
    """Sustained read bandwidth in GB/s: a C read loop (all cores), numpy as fallback."""
    gcc = shutil.which("gcc")
    if gcc:
        with tempfile.TemporaryDirectory() as tmp:
            src, exe = Path(tmp) / "bw.c", Path(tmp) / "bw"
            src.write_text(BANDWIDTH_C)
            built = subprocess.run([gcc, "-O3", "-march=native", "-fopenmp", str(src), "-o", str(exe)],
                                   capture_output=True)  # fmt: skip
            if built.returncode == 0:
                out = subprocess.run([str(exe), str(size_mb), str(repeats)], capture_output=True, text=True)
                values = [float(v) for v in out.stdout.split()][1:]  # first pass warms the pages
                return {"tool": "C AVX2 read loop (OpenMP, all cores)", "gb_s": summarize(values).__dict__}
    import numpy as np

    arr = np.ones(size_mb * 1024 * 1024 // 8)
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        arr.sum()
        values.append(arr.nbytes / (time.perf_counter() - start) / 1e9)
    return {"tool": "numpy sum (underestimates)", "gb_s": summarize(values[1:]).__dict__}


def weight_bytes(xml_path: Path) -> int:
    """Bytes of weight constants a forward of this IR reads (as stored: int4 packed, scales included)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml_path))
    return sum(op.get_byte_size() for op in model.get_ops()
               if op.get_type_name() == "Constant" and op.get_byte_size() >= 4096)  # fmt: skip


def kv_bytes_read(config: dict, context: int, bytes_per_value: float) -> float:
    """KV cache bytes read per decoded token at a given context length."""
    text = config.get("text_config", {})
    layers = text.get("num_hidden_layers", 32)
    heads = text.get("num_key_value_heads", text.get("num_attention_heads", 32))
    head_dim = text.get("head_dim") or text.get("hidden_size", 4096) // text.get("num_attention_heads", 32)
    return 2 * layers * heads * head_dim * context * bytes_per_value


# ---------------------------------------------------------------- engines


class OursEngine:
    json_schema: dict | None = None
    max_image_tokens: int | None = None
    pruning: float = 0.0
    prompt_lookup: int = 0
    jump_forward: bool = True
    use_draft: bool = True

    def __init__(self, export: Path, settings: LoadSettings, name: str = "ours"):
        from llava_ov.runtime.pipeline import Pipeline

        start = time.perf_counter()
        self.pipe = Pipeline(export, settings)
        self.name = name
        self.load_s = time.perf_counter() - start

    def with_schema(self, schema: dict) -> OursEngine:
        """The same loaded pipeline, answering under a JSON schema (constrained decoding)."""
        other = copy.copy(self)
        other.name, other.json_schema = "ours+json", schema
        return other

    def with_speculation(
        self, name: str, prompt_lookup: int = 0, jump_forward: bool = True, use_draft: bool = True
    ) -> OursEngine:
        """The same loaded pipeline (and schema) with prompt lookup on, jump-forward off, or its draft model off."""
        other = copy.copy(self)
        other.name, other.prompt_lookup, other.jump_forward, other.use_draft = name, prompt_lookup, jump_forward, use_draft
        return other

    def with_image_tokens(self, budget: int | None, pruning: float) -> OursEngine:
        """The same loaded pipeline with an image-token budget and/or visual-token pruning."""
        other = copy.copy(self)
        other.max_image_tokens, other.pruning = budget, pruning
        other.name = "ours[" + ",".join(
            ([f"max_image_tokens={budget}"] if budget else []) + ([f"pruning={pruning:g}"] if pruning else [])
        ) + "]"
        return other

    def run(self, image: Path, prompt: str, max_new: int) -> RunMetrics:
        from llava_ov.runtime.generate import GenerationConfig

        self.pipe.clear_caches()  # first-turn numbers: no KV reuse, no cached image features
        engine = self.pipe.engine
        cfg = GenerationConfig(max_new_tokens=max_new, ignore_eos=True, json_schema=self.json_schema,
                               max_image_tokens=self.max_image_tokens, visual_token_pruning=self.pruning,
                               prompt_lookup=self.prompt_lookup, jump_forward=self.jump_forward,
                               use_draft=self.use_draft)  # fmt: skip
        chunks = self.pipe.stream(prompt, [image], cfg)
        result = next(c for c in chunks if True)  # first token: start counting OpenVINO time after it
        infer_before = engine.infer_s if engine else 0.0
        for result in chunks:  # noqa: B007
            pass
        res = result.result
        t = res.timings
        overhead = 1 - (engine.infer_s - infer_before) / t.decode_s if engine and t.decode_s else None
        grammar = t.grammar_s / len(res.token_ids) if self.json_schema is not None and res.token_ids else None
        return RunMetrics(t.preprocess_s, t.vision_s, t.ttft_s, t.tpot_s, res.image_tokens, res.prompt_tokens,
                          len(res.token_ids), overhead, grammar_per_token_s=grammar, prefill_s=t.prefill_s,
                          image_tokens_total=res.image_tokens_total, prune_s=t.prune_s,
                          proposed=res.proposed_tokens, accepted=res.accepted_tokens)  # fmt: skip

    def follow_up(self, image: Path, prompt: str, follow: str, max_new: int) -> tuple[float, float]:
        """TTFT of a first turn and of a follow-up about the same image (KV and feature reuse)."""
        from llava_ov.runtime.chat import ChatSession
        from llava_ov.runtime.generate import GenerationConfig

        self.pipe.clear_caches()
        session = ChatSession(self.pipe)
        cfg = GenerationConfig(max_new_tokens=max_new, ignore_eos=True)
        first = session.ask(prompt, [image], cfg)
        second = session.ask(follow, config=cfg)
        return first.timings.ttft_s, second.timings.ttft_s


class GenaiEngine:
    name = "genai"

    def __init__(self, export: Path, device: str, properties: dict, backend: str = "SDPA"):
        import openvino_genai as og

        self.og = og
        start = time.perf_counter()
        kwargs = dict(properties)
        if backend == "PA":
            scheduler = og.SchedulerConfig()
            scheduler.enable_prefix_caching = False  # first-turn TTFT must not skip the prefill
            kwargs["scheduler_config"] = scheduler
        self.vlm = og.VLMPipeline(str(export), device, ATTENTION_BACKEND=backend, **kwargs)
        self.load_s = time.perf_counter() - start

    def run(self, image: Path, prompt_text: str, max_new: int) -> RunMetrics:
        import numpy as np
        import openvino as ov
        from PIL import Image

        cfg = self.og.GenerationConfig()
        cfg.max_new_tokens, cfg.ignore_eos, cfg.do_sample, cfg.apply_chat_template = max_new, True, False, False
        pixels = np.array(Image.open(image).convert("RGB"))
        og = self.og
        stamps: list[float] = []

        class Clock(og.StreamerBase):  # called once per generated token
            def write(self, token):
                stamps.extend([time.perf_counter()] * (len(token) if isinstance(token, list) else 1))
                return og.StreamingStatus.RUNNING

            def end(self):
                pass

        result = self.vlm.generate(prompt_text, images=[ov.Tensor(pixels[None])], generation_config=cfg,
                                   streamer=Clock())  # fmt: skip
        pm = result.perf_metrics
        ms = 1e-3
        vision = pm.get_vision_encoding_duration().mean * ms
        wall = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
        return RunMetrics(0.0, vision, pm.get_ttft().mean * ms, pm.get_tpot().mean * ms, 0,
                          pm.get_num_input_tokens(), pm.get_num_generated_tokens(), tpot_wall_s=wall)  # fmt: skip


class TorchEngine:
    name = "transformers"

    def __init__(self, checkpoint: str, dtype: str):
        import torch
        import transformers

        from llava_ov.exporting.convert import read_source_config
        from llava_ov.runtime.families import family_for

        cfg, _ = read_source_config(checkpoint)
        start = time.perf_counter()
        cls = getattr(transformers, family_for(cfg).architecture)
        self.model = cls.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
        self.processor = family_for(cfg).export_hooks().load_processor(checkpoint, None)  # no torchvision needed
        self.load_s = time.perf_counter() - start

    def run(self, image: Path, prompt: str, max_new: int) -> RunMetrics:
        import torch
        from PIL import Image

        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(chat, add_generation_prompt=True)
        start = time.perf_counter()
        inputs = self.processor(images=[Image.open(image).convert("RGB")], text=text, return_tensors="pt")
        prep = time.perf_counter() - start
        stamps: list[float] = []

        class Clock:
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        with torch.no_grad():
            self.model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                streamer=Clock())  # fmt: skip
        gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # stamps[0] is the prompt
        return RunMetrics(prep, 0.0, stamps[1] - start, statistics.fmean(gaps) if gaps else 0.0, 0,
                          int(inputs["input_ids"].shape[1]), len(stamps) - 1)  # fmt: skip


# ---------------------------------------------------------------- driver


@dataclass
class BenchOptions:
    model: Path
    image: Path
    prompt: str = "Describe this image in detail."
    follow_up: str = "What colours stand out?"
    max_new_tokens: int = 64
    runs: int = 5
    warmup: int = 1
    load: LoadSettings = field(default_factory=LoadSettings)  # ours, with every load setting; genai: device, properties
    compare: tuple[str, ...] = ()
    genai_backend: str = "SDPA"
    source: str | None = None  # transformers checkpoint (default: export_info source)
    torch_dtype: str = "float32"
    bandwidth: bool = True
    isolated_rss: bool = False  # peak RSS of each engine alone, in a child process (one extra run each)
    json_schema: dict | None = None  # also time ours under this schema ("ours+json", same loaded pipeline), and
    # with jump-forward off ("ours+json-nojf")
    prompt_lookup: int = 0  # also time ours with prompt lookup proposing this many tokens ("ours+lookup")
    # also time ours with fewer image tokens: (max_image_tokens or None, pruning ratio) per variant
    image_token_variants: tuple[tuple[int | None, float], ...] = ()


def make_engine(name: str, opts: BenchOptions):
    """Load one engine on the export (or, for transformers, its source checkpoint)."""
    if name == "ours":
        return OursEngine(opts.model, opts.load)
    if name in LOAD_VARIANTS:
        return OursEngine(opts.model, replace(opts.load, **LOAD_VARIANTS[name]), name)
    if name == "genai":
        return GenaiEngine(opts.model, opts.load.device, opts.load.properties, opts.genai_backend)
    if name == "transformers":
        return TorchEngine(opts.source or _export_source(opts.model), opts.torch_dtype)
    raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES[1:])}")


def shown_path(path: Path) -> str:
    """A path as a report shows it: relative to the working folder when inside it, else its last part (a
    report names what was measured, not the machine's folders)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def shown_load(settings: LoadSettings) -> dict[str, Any]:
    """The load settings as a report shows them (the draft export and part paths as `shown_path`)."""
    out = asdict(settings)
    if settings.draft is not None:
        out["draft"] = shown_path(Path(settings.draft))
    out["part_paths"] = {part: shown_path(Path(path)) for part, path in settings.part_paths.items()}
    return out


def run_bench(opts: BenchOptions, log=print) -> dict[str, Any]:
    """Load every engine, warm up, then interleave the timed runs; returns the report dict."""
    engines, loaded_rss = [], {}
    for name in ("ours", *opts.compare):
        before = current_rss()
        engines.append(make_engine(name, opts))
        loaded_rss[name] = current_rss() - before
    ours = engines[0]
    if opts.json_schema is not None:
        engines.insert(1, ours.with_schema(opts.json_schema))
        engines.insert(2, engines[1].with_speculation("ours+json-nojf", jump_forward=False))
        loaded_rss["ours+json"] = loaded_rss["ours+json-nojf"] = 0
    if opts.prompt_lookup:
        engines.insert(1, ours.with_speculation("ours+lookup", prompt_lookup=opts.prompt_lookup))
        loaded_rss["ours+lookup"] = 0
    if opts.load.draft is not None:  # ours proposes with the --draft model: time it without, side by side
        engines.insert(1, ours.with_speculation("ours-nodraft", use_draft=False))
        loaded_rss["ours-nodraft"] = 0
    for budget, pruning in opts.image_token_variants:
        engines.insert(1, ours.with_image_tokens(budget, pruning))
        loaded_rss[engines[1].name] = 0
    prompts = {e.name: engine_prompt(e.name, opts.model, opts.image, opts.prompt) for e in engines}
    runs: dict[str, list[RunMetrics]] = {e.name: [] for e in engines}
    with RssSampler() as sampler:
        for i in range(opts.warmup + opts.runs):
            for engine in engines:
                metrics = engine.run(opts.image, prompts[engine.name], opts.max_new_tokens)
                if i >= opts.warmup:
                    runs[engine.name].append(metrics)
            log(f"[bench] run {i + 1}/{opts.warmup + opts.runs}{' (warm-up)' if i < opts.warmup else ''} done")
        follow = [ours.follow_up(opts.image, opts.prompt, opts.follow_up, 8) for _ in range(max(2, opts.runs // 2))]
    report = {
        "machine": machine_info(),
        "options": {k: (shown_path(v) if isinstance(v, Path) else shown_load(v) if k == "load" else v)
                    for k, v in opts.__dict__.items()},  # fmt: skip
        "engines": {e.name: engine_summary(e, runs[e.name], loaded_rss[e.name]) for e in engines},
        "peak_rss_mb": sampler.peak / 2**20,
        "follow_up": {"first_ttft": summarize([f for f, _ in follow]).__dict__,
                      "follow_up_ttft": summarize([s for _, s in follow]).__dict__,
                      "ratio": statistics.fmean(s / f for f, s in follow)},  # fmt: skip
    }
    if opts.isolated_rss:
        for name in report["engines"]:
            report["engines"][name]["isolated_peak_rss_mb"] = isolated_peak_rss(opts, name)
    if opts.bandwidth:
        report["bound"] = bandwidth_bound(opts.model, runs["ours"], ours)
    report["ratios"] = ratios(report["engines"])
    return report


def isolated_peak_rss(opts: BenchOptions, engine: str) -> float:
    """Peak RSS (MB) of a fresh process that loads one engine and runs the workload once.

    In one process, engines share the memory-mapped weight files, so per-engine deltas mislead."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_child_peak_rss, (opts, engine))


def _child_peak_rss(opts: BenchOptions, engine: str) -> float:
    # Sampled, not ru_maxrss: Linux carries the parent's high-water mark into children across fork and exec.
    with RssSampler() as sampler:
        _child_run(opts, engine)
    return sampler.peak / 2**20


def _child_run(opts: BenchOptions, engine: str) -> None:
    make_engine(engine, opts).run(opts.image, engine_prompt(engine, opts.model, opts.image, opts.prompt),
                                  opts.max_new_tokens)  # fmt: skip


def _export_source(export: Path) -> str:
    from llava_ov.errors import LlavaOvError
    from llava_ov.runtime.export import ExportDir

    source = ExportDir(export).info.get("source")
    if not source:
        raise LlavaOvError(f"{export} has no export_info.json naming its source checkpoint; pass the checkpoint")
    return source


def engine_summary(engine, runs: list[RunMetrics], rss_bytes: int) -> dict[str, Any]:
    keys = ("preprocess_s", "vision_s", "ttft_s", "tpot_s", "tokens_per_s")
    out: dict[str, Any] = {k: summarize([getattr(r, k) for r in runs]).__dict__ for k in keys}
    out.update(load_s=engine.load_s, rss_added_mb=rss_bytes / 2**20, prompt_tokens=runs[0].prompt_tokens,
               image_tokens=runs[0].image_tokens, generated=runs[0].generated)  # fmt: skip
    overheads = [r.overhead_share for r in runs if r.overhead_share is not None]
    if overheads:
        out["python_overhead_share"] = summarize(overheads).__dict__
    walls = [r.tpot_wall_s for r in runs if r.tpot_wall_s is not None]
    if walls:
        out["tpot_wall_s"] = summarize(walls).__dict__
    for key in ("prefill_s", "prune_s"):
        values = [getattr(r, key) for r in runs if getattr(r, key) is not None]
        if values:
            out[key] = summarize(values).__dict__
    if runs[0].image_tokens_total is not None:
        out["image_tokens_total"] = runs[0].image_tokens_total
    if any(r.proposed for r in runs):
        proposed, accepted = sum(r.proposed for r in runs), sum(r.accepted for r in runs)
        out["speculation"] = {"proposed": proposed, "accepted": accepted, "acceptance": accepted / proposed,
                              "accepted_per_token": accepted / max(1, sum(r.generated for r in runs))}  # fmt: skip
    grammar = [r.grammar_per_token_s for r in runs if r.grammar_per_token_s is not None]
    if grammar:
        out["grammar_per_token_s"] = summarize(grammar).__dict__
        out["generated"] = summarize([float(r.generated) for r in runs]).__dict__  # the JSON decides the length
    return out


def ratios(engines: dict[str, Any]) -> dict[str, float]:
    """ours relative to each other engine (>1 means ours is faster for speed, smaller for times)."""
    ours = engines["ours"]
    out = {}
    for name, other in engines.items():
        if name == "ours+json":
            out["tpot_json_over_plain"] = other["tpot_s"]["mean"] / ours["tpot_s"]["mean"]
        elif name == "ours+json-nojf":  # decode tokens/s with jump-forward over without
            out["json_tokens_per_s_jump_forward_over_off"] = other["tpot_s"]["mean"] / engines["ours+json"]["tpot_s"]["mean"]
        elif name == "ours+lookup":
            out["tokens_per_s_lookup_over_plain"] = ours["tpot_s"]["mean"] / other["tpot_s"]["mean"]
        elif name.startswith("ours["):
            out[f"ttft_{name}_over_ours"] = other["ttft_s"]["mean"] / ours["ttft_s"]["mean"]
            out[f"prefill_{name}_over_ours"] = other["prefill_s"]["mean"] / ours["prefill_s"]["mean"]
            out[f"image_tokens_{name}_over_ours"] = other["image_tokens"] / ours["image_tokens"]
        elif name != "ours":
            out[f"tpot_{name}_over_ours"] = other["tpot_s"]["mean"] / ours["tpot_s"]["mean"]
            out[f"ttft_ours_over_{name}"] = ours["ttft_s"]["mean"] / other["ttft_s"]["mean"]
            if "tpot_wall_s" in other:
                out[f"tpot_{name}_wall_over_ours"] = other["tpot_wall_s"]["mean"] / ours["tpot_s"]["mean"]
    return out


def bandwidth_bound(export: Path, runs: list[RunMetrics], ours: OursEngine) -> dict[str, Any]:
    from llava_ov.common.layout import LANGUAGE_MODEL

    bw = measure_bandwidth()
    weights = weight_bytes(export / LANGUAGE_MODEL)
    kv_precision = str(ours.pipe.model.runtime_info()["language"].get("KV_CACHE_PRECISION", "f16"))
    kv_bytes_per_value = {"f32": 4, "f16": 2, "bf16": 2, "u8": 1, "i8": 1, "u4": 0.5}.get(kv_precision, 2)
    context = runs[0].prompt_tokens + runs[0].generated // 2
    kv = kv_bytes_read(ours.pipe.model.config, context, kv_bytes_per_value)
    bound_tps = bw["gb_s"]["mean"] * 1e9 / (weights + kv)
    tps = statistics.fmean(r.tokens_per_s for r in runs)
    return {"bandwidth": bw, "weight_bytes": weights, "kv_bytes_per_token": kv, "kv_precision": kv_precision,
            "bound_tokens_per_s": bound_tps, "decode_tokens_per_s": tps, "share_of_bound": tps / bound_tps}  # fmt: skip


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"  # not measured (without --isolated-rss): a dash, not nan


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables of the report."""
    rows = ["| engine | load s | preprocess ms | vision ms | TTFT ms (image encoding included) | TPOT ms | tokens/s | "
            "peak RSS MB (alone, --isolated-rss) |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in report["engines"].items():
        rows.append(f"| {name} | {e['load_s']:.1f} | {Stat(**e['preprocess_s']).fmt(1e3)} | "
                    f"{Stat(**e['vision_s']).fmt(1e3)} | {Stat(**e['ttft_s']).fmt(1e3)} | "
                    f"{Stat(**e['tpot_s']).fmt(1e3, 2)} | {Stat(**e['tokens_per_s']).fmt(1, 2)} | "
                    f"{_mb(e.get('isolated_peak_rss_mb'))} |")  # fmt: skip
    ours = report["engines"]["ours"]
    lines = ["\n".join(rows), "",
             f"prompt tokens {ours['prompt_tokens']} ({ours['image_tokens']} image), generated {ours['generated']}",
             f"process peak RSS {report['peak_rss_mb']:.0f} MB"]  # fmt: skip
    if "python_overhead_share" in ours:
        lines.append(f"Python overhead: {Stat(**ours['python_overhead_share']).fmt(100, 2)} % of decode time")
    if "ours+json" in report["engines"]:
        j = report["engines"]["ours+json"]
        lines.append(f"JSON schema: grammar {Stat(**j['grammar_per_token_s']).fmt(1e3, 3)} ms per token; TPOT "
                     f"{Stat(**j['tpot_s']).fmt(1e3, 2)} ms vs {Stat(**ours['tpot_s']).fmt(1e3, 2)} ms without "
                     f"({j['tpot_s']['mean'] / ours['tpot_s']['mean'] - 1:+.1%}); "
                     f"{Stat(**j['generated']).fmt(1, 0)} tokens per answer")  # fmt: skip
    variants = [(n, e) for n, e in report["engines"].items() if n == "ours" or n.startswith("ours[")]
    if len(variants) > 1:
        lines += ["", "| setting | image tokens kept / total | vision ms | selection ms | LM prefill ms | TTFT ms |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, e in sorted(variants, key=lambda v: -v[1]["image_tokens"]):
            prune = Stat(**e["prune_s"]).fmt(1e3) if "prune_s" in e and e["prune_s"]["mean"] else "-"
            lines.append(f"| {name} | {e['image_tokens']} / {e.get('image_tokens_total', e['image_tokens'])} | "
                         f"{Stat(**e['vision_s']).fmt(1e3)} | {prune} | {Stat(**e['prefill_s']).fmt(1e3)} | "
                         f"{Stat(**e['ttft_s']).fmt(1e3)} |")  # fmt: skip
        lines.append("")
    f = report["follow_up"]
    lines.append(f"chat (ChatSession, 8 new tokens): turn-2 TTFT {Stat(**f['follow_up_ttft']).fmt(1e3)} ms vs "
                 f"turn-1 TTFT {Stat(**f['first_ttft']).fmt(1e3)} ms (ratio {f['ratio']:.1%}; turn 1 here excludes "
                 "image encoding, which the chat does while it counts the prompt's tokens)")  # fmt: skip
    for key, value in report.get("ratios", {}).items():
        lines.append(f"{key}: {value:.3f}")
    if "bound" in report:
        b = report["bound"]
        lines.append(f"bandwidth {Stat(**b['bandwidth']['gb_s']).fmt(1, 1)} GB/s ({b['bandwidth']['tool']}); "
                     f"weights {b['weight_bytes'] / 1e6:.0f} MB + KV {b['kv_bytes_per_token'] / 1e6:.1f} MB per token"
                     f" -> bound {b['bound_tokens_per_s']:.2f} tokens/s; decode at {b['share_of_bound']:.1%} of it")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time an export (and compare with openvino_genai / transformers)")
    p.add_argument("model", help="export directory")
    p.add_argument("--image", default=None, help="image file (default: a bundled example photo)")
    p.add_argument("--prompt", default="Describe this image in detail.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    LoadSettings.add_arguments(p)  # ours runs with every load setting, as the server does
    p.add_argument("--compare", default="",
                   help="comma list: genai, transformers, ours-f32-decode / ours-same-decode (ours with "
                        "--decode-precision f32 / same), ours-plugin-dq / ours-weights-dq (--dq-group-size)")  # fmt: skip
    p.add_argument("--genai-backend", default="SDPA", choices=["SDPA", "PA"])
    p.add_argument("--source", default=None, help="transformers checkpoint for --compare transformers")
    p.add_argument("--torch-dtype", default="float32")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth-bound measurement")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="also time answers constrained to this JSON Schema, with grammar jump-forward on (ours+json) "
                        "and off (ours+json-nojf): grammar cost per token, TPOT ratio")  # fmt: skip
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="also time ours with prompt lookup proposing up to N tokens per step (ours+lookup)")
    p.add_argument("--max-image-tokens", default="", metavar="N[,N...]",
                   help="also time ours with each image-token budget (TTFT vs image tokens)")  # fmt: skip
    p.add_argument("--visual-token-pruning", default="", metavar="RATIO[,RATIO...]",
                   help="also time ours with each CDPruner ratio, e.g. 0.5,0.75,0.9")  # fmt: skip
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="with --max-image-tokens/--visual-token-pruning: plot TTFT and LM prefill vs image tokens")
    p.add_argument("--isolated-rss", action="store_true",
                   help="also measure each engine's peak RSS alone in a child process (one extra run each)")  # fmt: skip
    p.add_argument("--concurrency", default="",
                   help="comma list of concurrent streams, e.g. 1,2,4,8: aggregate decode throughput of the engine "
                        "vs the one-at-a-time path (and genai's ContinuousBatchingPipeline with --compare genai)")  # fmt: skip
    p.add_argument("--video", default=None, metavar="FILE",
                   help="time a video prompt instead (LLaVA-NeXT-Video exports): TTFT and memory per --frames")  # fmt: skip
    p.add_argument("--frames", default="8,16,32", metavar="N[,N...]", help="with --video: frame counts to sample")
    p.add_argument("--json", default=None, help="write the report as JSON to this file ('-' for stdout)")
    p.set_defaults(func=cmd_bench)


def default_image() -> Path:
    here = Path(__file__).resolve().parents[3] / "examples" / "cat.jpg"
    if here.exists():
        return here
    from llava_ov.errors import InvalidImageError

    raise InvalidImageError("no --image given and the bundled example photo is not available")


def image_token_variants(budgets: str, ratios: str) -> tuple[tuple[int | None, float], ...]:
    """Comma lists of budgets and pruning ratios as bench variants (each on its own, from the full image)."""
    from llava_ov.runtime.generate import GenerationConfig

    variants = [(int(b), 0.0) for b in budgets.split(",") if b.strip()]
    variants += [(None, float(r)) for r in ratios.split(",") if r.strip()]
    for budget, ratio in variants:
        GenerationConfig(max_image_tokens=budget, visual_token_pruning=ratio).validate()
    return tuple(variants)


def plot_image_tokens(report: dict[str, Any], path: Path) -> None:
    """TTFT and its language-model part against the image tokens kept: one line per way of cutting
    them (image-token budget, pruning), both starting from the full image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = report["engines"]
    series = {"image-token budget": "max_image_tokens=", "visual-token pruning": "pruning="}
    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, key), color in zip(series.items(), ("tab:blue", "tab:orange")):
        names = ["ours"] + [n for n in engines if n.startswith("ours[") and key in n]
        if len(names) < 2:
            continue
        points = sorted((engines[n]["image_tokens"], engines[n]["ttft_s"], engines[n]["prefill_s"], n) for n in names)
        x = [p[0] for p in points]
        ax.errorbar(x, [p[1]["mean"] for p in points], yerr=[p[1]["std"] for p in points], marker="o", capsize=3,
                    color=color, label=f"{label}: TTFT")  # fmt: skip
        ax.errorbar(x, [p[2]["mean"] for p in points], yerr=[p[2]["std"] for p in points], marker="s", capsize=3,
                    color=color, linestyle="--", label=f"{label}: LM prefill")  # fmt: skip
        for p in points[:-1]:
            ax.annotate(p[3].split("=", 1)[1].rstrip("]"), (p[0], p[1]["mean"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 4))  # fmt: skip
    save_seconds_plot(fig, ax, path, "image tokens kept (rightmost: the full image)", "TTFT vs image tokens",
                      report["machine"])  # fmt: skip


def bench_options(args) -> BenchOptions:
    """What the `bench` flags ask for; ours loads with every load setting (LoadSettings), as the server does."""
    from llava_ov.runtime.constrained import load_schema

    return BenchOptions(
        model=Path(args.model), image=Path(args.image) if args.image else default_image(), prompt=args.prompt,
        max_new_tokens=args.max_new_tokens, runs=args.runs, warmup=args.warmup,
        load=LoadSettings.from_args(args).validate(), genai_backend=args.genai_backend,
        compare=tuple(c for c in args.compare.split(",") if c), source=args.source, torch_dtype=args.torch_dtype,
        bandwidth=not args.no_bandwidth, isolated_rss=args.isolated_rss,
        json_schema=load_schema(args.json_schema) if args.json_schema else None, prompt_lookup=args.prompt_lookup,
        image_token_variants=image_token_variants(args.max_image_tokens, args.visual_token_pruning),
    )  # fmt: skip


def cmd_bench(args) -> int:
    from llava_ov.errors import require_extra

    opts = bench_options(args)
    if "genai" in opts.compare:
        require_extra("openvino_genai", "bench", "--compare genai")
    if "transformers" in opts.compare:
        require_extra("transformers", "convert", "--compare transformers")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.video:
        from llava_ov.tools.bench_video import VideoBenchOptions, format_video_report, plot_video, run_video_bench

        frames = tuple(int(n) for n in args.frames.split(",") if n.strip())
        report = run_video_bench(VideoBenchOptions(
            opts.model, Path(args.video), frames, max_new_tokens=opts.max_new_tokens, runs=opts.runs,
            warmup=opts.warmup, load=opts.load, compare=opts.compare, genai_backend=opts.genai_backend,
        ), log)  # fmt: skip
        formatted = format_video_report(report)
        if args.plot:
            plot_video(report, Path(args.plot))
    elif args.concurrency:
        levels = [int(n) for n in args.concurrency.split(",") if n]
        report = run_concurrency(opts.model, opts.image, levels, opts.max_new_tokens, opts.runs, opts.load,
                                 opts.compare, log)  # fmt: skip
        report["machine"] = machine_info()
        formatted = format_concurrency(report)
    else:
        report = run_bench(opts, log=log)
        formatted = format_report(report)
        if args.plot:
            plot_image_tokens(report, Path(args.plot))
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(formatted)
    return 0
