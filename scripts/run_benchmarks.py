#!/usr/bin/env python
"""Run the benchmark suite on the models from build_bench_models.py and render docs/benchmarks.md.

  python scripts/run_benchmarks.py run --layers 2 4      # timed runs -> artifacts/bench/results/*.json
  python scripts/run_benchmarks.py report                # tables + plots from those JSON files

Suites (each one `llava_ov.tools.bench.run_bench`, engines interleaved in one process):
  <L>L-fp16   ours vs openvino_genai (+ transformers float32 and per-engine peak RSS on the smallest model)
  <L>L-int8   ours vs openvino_genai
  <L>L-int4   ours vs openvino_genai
  <L>L-vision-int8   ours (INT8 PTQ vision encoder, fp16 LM)
  <L>L-ttft-sizes    TTFT vs image size (ours and genai), 4 image sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "cat.jpg"
SIZES = [(336, 336), (336, 672), (672, 672), (1008, 336)]  # (height, width): 1x2 (tie), 1x2, 2x2, 3x1 grids


def suite_plan(layers: int, work: Path, full: bool) -> list[tuple[str, dict]]:
    """`full` (the smallest model): also PyTorch and per-engine peak RSS; deeper models feed the extrapolation."""
    base = dict(image=IMAGE, runs=3, warmup=1, max_new_tokens=32, isolated_rss=full)
    fp16 = work / f"ov-{layers}L-fp16"
    plan = [
        (f"{layers}L-fp16", dict(model=fp16, compare=("genai", "transformers") if full else ("genai",), **base)),
        (f"{layers}L-int8", dict(model=work / f"ov-{layers}L-int8", compare=("genai",), **base)),
        (f"{layers}L-int4", dict(model=work / f"ov-{layers}L-int4", compare=("genai",), **base)),
    ]
    vision = work / f"ov-{layers}L-fp16-vision-int8"
    if vision.exists():  # built for one layer count only
        plan.append((f"{layers}L-vision-int8", dict(model=vision, compare=(), **base)))
    return plan


def run_suites(layers_list: list[int], work: Path, only: set[str]) -> None:
    from llava_ov.tools.bench import BenchOptions, run_bench

    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    for layers in layers_list:
        full = layers == min(layers_list)
        for name, kwargs in suite_plan(layers, work, full):
            if only and name not in only:
                continue
            print(f"=== {name}", flush=True)
            report = run_bench(BenchOptions(**kwargs), log=lambda m: print(m, flush=True))
            (results / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        if (full and not only) or f"{layers}L-ttft-sizes" in only:
            ttft_vs_size(layers, work, results)


def ttft_vs_size(layers: int, work: Path, results: Path) -> None:
    """TTFT for several image sizes on the int4 export: ours and genai, 2 runs each after a warm-up."""
    from PIL import Image

    from llava_ov.tools.bench import BenchOptions, run_bench

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for h, w in SIZES:
            path = Path(tmp) / f"{h}x{w}.jpg"
            Image.open(IMAGE).convert("RGB").resize((w, h)).save(path, quality=92)
            opts = BenchOptions(model=work / f"ov-{layers}L-int4", image=path, runs=2, warmup=1, max_new_tokens=4,
                                compare=("genai",), bandwidth=False)  # fmt: skip
            rep = run_bench(opts, log=lambda m: None)
            rows.append({"size": [h, w], "image_tokens": rep["engines"]["ours"]["image_tokens"],
                         "ours_ttft_s": rep["engines"]["ours"]["ttft_s"],
                         "genai_ttft_s": rep["engines"]["genai"]["ttft_s"]})  # fmt: skip
            print(f"{h}x{w}: {rows[-1]['image_tokens']} image tokens", flush=True)
    (results / f"{layers}L-ttft-sizes.json").write_text(json.dumps(rows, indent=2) + "\n")


# ---------------------------------------------------------------- report


def fmt(stat: dict, scale: float = 1.0, digits: int = 1) -> str:
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def engine_table(results: dict[str, dict]) -> str:
    rows = ["| model | engine | load s | vision ms | image tokens | TTFT ms | TPOT ms | tokens/s | peak RSS GiB |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rep in results.items():
        for engine, e in rep["engines"].items():
            rss = e.get("isolated_peak_rss_mb")
            rows.append(f"| {name} | {engine} | {e['load_s']:.1f} | {fmt(e['vision_s'], 1e3, 0)} | "
                        f"{e['image_tokens'] or '-'} | {fmt(e['ttft_s'], 1e3, 0)} | {fmt(e['tpot_s'], 1e3, 1)} | "
                        f"{fmt(e['tokens_per_s'], 1, 2)} | {f'{rss / 1024:.2f}' if rss else '-'} |")  # fmt: skip
    return "\n".join(rows)


def _relative_spread(rep: dict, key: str, engines: tuple[str, str] = ("ours", "genai")) -> float | None:
    """Combined relative standard deviation of `key` for two engines: the noise of their ratio."""
    try:
        stats = [rep["engines"][e][key] for e in engines]
    except KeyError:
        return None
    return sum((s["std"] / s["mean"]) ** 2 for s in stats) ** 0.5


TARGETS = [  # (target, value read from one suite's report, pass test, format, noise of the value or None)
    ("TPOT no worse than genai (genai's own TPOT / ours)", lambda r: r.get("ratios", {}).get("tpot_genai_over_ours"),
     lambda v: v >= 1.0, "{:.3f}", lambda r: _relative_spread(r, "tpot_s")),
    ("TPOT no worse than genai (both timed per token in Python)",
     lambda r: r.get("ratios", {}).get("tpot_genai_wall_over_ours"), lambda v: v >= 1.0, "{:.3f}",
     lambda r: _relative_spread(r, "tpot_s")),
    ("TTFT within 5 % of genai", lambda r: r.get("ratios", {}).get("ttft_ours_over_genai"), lambda v: v <= 1.05,
     "{:.3f}", None),
    ("decode >= 3x PyTorch", lambda r: r.get("ratios", {}).get("tpot_transformers_over_ours"), lambda v: v >= 3.0,
     "{:.2f}x", None),
    ("decode >= 80 % of bandwidth bound", lambda r: r.get("bound", {}).get("share_of_bound"), lambda v: v >= 0.8,
     "{:.0%}", None),
    ("Python overhead < 2 % of TPOT",
     lambda r: (r["engines"]["ours"].get("python_overhead_share") or {}).get("mean"), lambda v: v < 0.02, "{:.2%}", None),
    ("follow-up TTFT < 15 % of first", lambda r: r.get("follow_up", {}).get("ratio"), lambda v: v < 0.15, "{:.1%}",
     None),
]  # fmt: skip


def targets_table(results: dict[str, dict]) -> str:
    """Each speed target against every suite that measures it: value and met / missed.

    A ratio target missed by less than the combined relative spread of the two engines'
    runs is marked "missed, within noise"."""
    names = [n for n in results if not n.endswith("vision-int8")]
    rows = ["| target | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, read, ok, form, noise_of in TARGETS:
        cells = []
        for name in names:
            value = read(results[name])
            if value is None:
                cells.append("-")
                continue
            noise = noise_of(results[name]) if noise_of else None
            verdict = "met" if ok(value) else ("missed, within noise" if noise and value >= 1 - noise else "**missed**")
            cells.append(f"{form.format(value)} {verdict}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ratio_table(results: dict[str, dict]) -> str:
    rows = ["| model | TPOT genai / ours | TPOT genai (per-token clock) / ours | TTFT ours / genai | TPOT torch / ours | "
            "Python overhead | follow-up TTFT / first | decode share of bandwidth bound |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rep in results.items():
        r, ours = rep.get("ratios", {}), rep["engines"]["ours"]
        over = ours.get("python_overhead_share")
        bound = rep.get("bound", {})
        rows.append(
            f"| {name} | {r.get('tpot_genai_over_ours', float('nan')):.3f} | "
            f"{r.get('tpot_genai_wall_over_ours', float('nan')):.3f} | "
            f"{r.get('ttft_ours_over_genai', float('nan')):.3f} | {r.get('tpot_transformers_over_ours', float('nan')):.2f} | "
            f"{fmt(over, 100, 2) + ' %' if over else '-'} | {rep['follow_up']['ratio']:.1%} | "
            f"{bound.get('share_of_bound', float('nan')):.1%} |"
        )
    return "\n".join(rows)


def bound_table(results: dict[str, dict]) -> str:
    rows = ["| model | bandwidth GB/s | weights MB | KV MB/token | bound tokens/s | measured tokens/s | share |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rep in results.items():
        b = rep.get("bound")
        if b:
            rows.append(f"| {name} | {fmt(b['bandwidth']['gb_s'], 1, 1)} | {b['weight_bytes'] / 1e6:.0f} | "
                        f"{b['kv_bytes_per_token'] / 1e6:.1f} ({b['kv_precision']}) | {b['bound_tokens_per_s']:.2f} | "
                        f"{b['decode_tokens_per_s']:.2f} | {b['share_of_bound']:.1%} |")  # fmt: skip
    return "\n".join(rows)


def extrapolation(results: dict[str, dict]) -> str:
    """TPOT and TTFT at 32 layers (extrapolated): linear fits over the measured layer counts, and for
    ours a steadier TPOT estimate: bytes read per token at 32 layers / the deepest model's achieved bytes/s."""
    out = ["| precision | engine | TPOT ms at 32 layers, linear fit | TPOT ms at 32 layers, bytes / achieved bandwidth | "
           "TTFT s at 32 layers, linear fit |", "|---|---|---|---|---|"]  # fmt: skip
    for prec in ("fp16", "int8", "int4"):
        points = {int(n.split("L-")[0]): rep for n, rep in results.items() if n.endswith(f"L-{prec}")}
        if len(points) < 2:
            continue
        xs = sorted(points)
        deepest = points[xs[-1]]["bound"]
        per_token = [points[x]["bound"]["weight_bytes"] + points[x]["bound"]["kv_bytes_per_token"] for x in xs]
        achieved = deepest["decode_tokens_per_s"] * (deepest["weight_bytes"] + deepest["kv_bytes_per_token"])
        for engine in ("ours", "genai"):
            tpot = [points[x]["engines"][engine]["tpot_s"]["mean"] for x in xs]
            ttft = [points[x]["engines"][engine]["ttft_s"]["mean"] for x in xs]
            by_bytes = f"{linear_at(xs, per_token, 32) / achieved * 1e3:.0f}" if engine == "ours" else "-"
            out.append(f"| {prec} | {engine} | {linear_at(xs, tpot, 32) * 1e3:.0f} | {by_bytes} | "
                       f"{linear_at(xs, ttft, 32):.1f} |")  # fmt: skip
    return "\n".join(out)


def linear_at(xs: list[int], ys: list[float], x: float) -> float:
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept + slope * x


def plots(results: dict[str, dict], sizes: dict[str, list], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rep in results.items():
        for engine in ("ours", "genai"):
            if engine in rep["engines"] and not name.endswith("vision-int8"):
                e = rep["engines"][engine]
                ax.errorbar(f"{name}\n{engine}", e["tpot_s"]["mean"] * 1e3, yerr=e["tpot_s"]["std"] * 1e3, fmt="o",
                            color="tab:blue" if engine == "ours" else "tab:orange")  # fmt: skip
    ax.set_ylabel("time per output token, ms")
    ax.set_title("Decode latency per token (mean ± std)")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "tpot.png", dpi=120)
    files.append("tpot.png")
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in sizes.items():
            rows = sorted(rows, key=lambda r: r["image_tokens"])
            tokens = [r["image_tokens"] for r in rows]
            for key, label in (("ours_ttft_s", "ours"), ("genai_ttft_s", "genai")):
                ax.errorbar(tokens, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows],
                            marker="o", label=f"{name} {label}")  # fmt: skip
        ax.set_xlabel("image tokens in the prompt")
        ax.set_ylabel("TTFT, s")
        ax.set_title("Time to first token vs image size (int4 LM)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "ttft_vs_image.png", dpi=120)
        files.append("ttft_vs_image.png")
    return files


def report(work: Path, doc: Path) -> None:
    res_dir = work / "results"
    results = {p.stem: json.loads(p.read_text()) for p in sorted(res_dir.glob("*L-*.json")) if "ttft-sizes" not in p.stem}
    sizes = {p.stem: json.loads(p.read_text()) for p in sorted(res_dir.glob("*ttft-sizes.json"))}
    any_rep = next(iter(results.values()))
    machine = any_rep["machine"]
    images = plots(results, sizes, doc.parent)
    size_rows = ["| model | image size (h×w) | image tokens | ours TTFT s | genai TTFT s |", "|---|---|---|---|---|"]
    for name, rows in sizes.items():
        for r in rows:
            size_rows.append(f"| {name} | {r['size'][0]}×{r['size'][1]} | {r['image_tokens']} | "
                             f"{fmt(r['ours_ttft_s'], 1, 2)} | {fmt(r['genai_ttft_s'], 1, 2)} |")  # fmt: skip
    kept = doc.read_text().partition(KEPT_MARKER)[2] if doc.exists() else ""  # hand-written engine section
    doc.write_text(TEMPLATE.format(
        machine=f"{machine['cpu']}, {machine['cores']} cores, OpenVINO {machine['openvino']}, Python {machine['python']}",
        engines=engine_table(results), ratios=ratio_table(results), bound=bound_table(results),
        extrapolation=extrapolation(results), sizes="\n".join(size_rows), targets=targets_table(results),
        plots="\n".join(f"![{p}]({p})" for p in images),
    ) + (KEPT_MARKER + kept if kept else ""))  # fmt: skip
    print(f"wrote {doc}")


KEPT_MARKER = "<!-- below: kept as it is by run_benchmarks.py report -->"

TEMPLATE = """# Benchmarks

Generated by `scripts/run_benchmarks.py report` from the JSON of `scripts/run_benchmarks.py run`
(commands below). **Models have the real llava-v1.6-mistral-7b dimensions (CLIP ViT-L/336, 24
layers; 4096-wide Mistral decoder layers; 32k vocabulary) but only a few decoder layers and random
weights** — real weights cannot be downloaded here. Numbers for 32 layers are extrapolated and
marked so.

Machine: {machine}. A shared 2-core VM: absolute times are noisy, so every comparison is
between engines run interleaved in the same process on the same export; read the ratios.
Each figure is mean ± standard deviation over 3 runs after 1 warm-up; prompt = one 451×300 photo
(examples/cat.jpg, 1464 image tokens) + a question; 32 new tokens with EOS ignored; plugin
default precision (this CPU has no bf16: f32 compute; KV-cache precision as reported below).
genai = openvino_genai.VLMPipeline on the same export (stateful SDPA backend). Its TPOT is shown
twice: as its own perf_metrics report it, and timed like ours — a Python clock read at every
generated token (a `StreamerBase` whose `write` is called per token), first to last token. transformers =
PyTorch on the source checkpoint in float32 (same compute precision as OpenVINO here).

## Engines side by side

{engines}

## Ratios (same run)

{ratios}

## Targets

{targets}

## What the targets show (this machine)

- **TPOT vs genai**: both engines run the same IR with the same plugin settings; ratios swing
  both ways between suites (0.88–1.20) by more than any systematic difference. Timing genai per
  token in Python (like ours) gives the same ratio as its own perf metrics, so the method is not
  the difference. `scripts/decode_variants.py` on the 2L-fp16 export, 3 interleaved rounds:
  genai 59.2 ± 4.0 ms, our `Pipeline.step` loop 60.7 ± 4.6 ms, a bare `infer` loop 59.9 ± 3.9 ms —
  a tie within noise; our Python overhead is 0.5–1.4 % of TPOT.
- **A real slowdown found and fixed on the way**: models imported from OpenVINO's compiled-model
  cache decoded the fp16 export 1.8x slower on this CPU (108–119 ms vs 54–63 ms per token); CPU
  parts are now compiled fresh by default (about 1 s), see docs/architecture.md.
- **Bandwidth bound**: fp16 reaches ~80 %; INT8/INT4 reach 53–73 %: decompressing INT4/INT8
  weights on 2 AVX2 cores (no AVX-512/VNNI) is compute-bound, and genai is equally far from the
  bound (same kernels). DYNAMIC_QUANTIZATION_GROUP_SIZE 0/32/64/128/256 made no measurable
  difference for INT4.
- **PyTorch**: transformers float32 vs our fp16-weights/f32-compute export: 2.3x in this run
  (3.0x in an earlier run of the same suite) — below the 3x target on this machine. Torch reads
  twice the weight bytes; the ratio moves with the machine's load.
- **TTFT** is dominated by the CLIP-L encoder on 5 tiles (~10 s of ~22 s on 2 cores); ours and
  genai are within 5 % except one noisy suite (±15 % spread).

## Bandwidth bound

Decode reads every language-model weight once per token plus the KV cache. Bound = sustained
read bandwidth (C read loop over 1 GiB, all cores, measured right before the runs) / bytes read
per token.

{bound}

## Extrapolation to 32 decoder layers (extrapolated, not measured)

Linear fits over 2 and 4 layers put a 16x lever on the noise of short runs (an INT4 TPOT above
INT8's is that noise, not a property of INT4). The bytes-based column assumes the 32-layer model
reads its weights and KV cache at the bytes/s the 4-layer model achieved; the real 32-layer fp16 LM
is ~14.5 GB, so on this machine's ~23 GB/s its decode bound is ~0.6 s per token.

{extrapolation}

## TTFT vs image size

INT4 export, 4 new tokens, 2 runs after a warm-up per size. "image tokens" are ours (transformers'
count); for the 336×336 image genai picks another anyres grid (its pinpoint-order difference,
see the strict xfail in tests/test_genai.py), so its prompt differs there.

{sizes}

{plots}

## Reproduce

```bash
python scripts/build_bench_models.py --layers 2 4 --work-dir artifacts/bench
python scripts/run_benchmarks.py run --layers 2 4 --work-dir artifacts/bench
python scripts/run_benchmarks.py report --work-dir artifacts/bench
```

A single export: `llava-ov bench EXPORT --compare genai,transformers --runs 3`.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--layers", type=int, nargs="+", default=[4])
    p.add_argument("--work-dir", type=Path, default=Path("artifacts/bench"))
    p.add_argument("--only", nargs="*", default=[], help="suite names, e.g. 4L-int4")
    p = sub.add_parser("report")
    p.add_argument("--work-dir", type=Path, default=Path("artifacts/bench"))
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if args.cmd == "run":
        run_suites(args.layers, args.work_dir, set(args.only))
    else:
        report(args.work_dir, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
