#!/usr/bin/env python
"""Peak memory of `llava-ov compress` versus decoder depth, extrapolated to the real 7B model.

Uses fp16 exports of random-weight models with the real llava-v1.6-mistral-7b
dimensions and 2, 4, 8 decoder layers: reused from --exports (the benchmark
models of build_bench_models.py, `ov-<L>L-fp16`) or converted here from the
checkpoints of convert_memory_scaling.py (`--checkpoints`/ckpt-<L>L). Then runs

    python -m llava_ov.cli compress EXPORT -o OUT --lm MODE --overwrite

once per model and mode in a fresh subprocess, samples its memory every ~50 ms
(process RSS + the private memory of its children, as in convert_memory_scaling.py),
fits peak = a + b * layers and extrapolates to 32 layers.

    python scripts/compress_memory_scaling.py --json artifacts/compress-memory/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_memory_scaling import GIB, REAL_LAYERS, Sampler, _peak, dir_bytes, linear_fit  # noqa: E402

GB = 1e9


def ensure_export(layers: int, exports: Path, checkpoints: Path, work: Path) -> Path:
    """An fp16 export with `layers` decoder layers: reused when present, else converted."""
    for candidate in (exports / f"ov-{layers}L-fp16", work / f"ov-{layers}L-fp16"):
        if (candidate / "export_info.json").exists():
            return candidate
    ckpt = checkpoints / f"ckpt-{layers}L"
    if not (ckpt / "config.json").exists():
        raise SystemExit(f"no fp16 export or checkpoint for {layers} layers (looked for {ckpt})")
    out = work / f"ov-{layers}L-fp16"
    print(f"converting {ckpt} -> {out} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "llava_ov.cli", "convert", str(ckpt), "-o", str(out),
                    "--weight-format", "fp16", "--overwrite"], check=True)  # fmt: skip
    return out


def compress_once(export: Path, out: Path, mode: str, interval: float) -> dict:
    """Run `llava-ov compress` in a subprocess and measure its peak memory and time."""
    cmd = [sys.executable, "-m", "llava_ov.cli", "compress", str(export), "-o", str(out), "--lm", mode, "--overwrite"]
    env = {**os.environ, "CI": "true"}  # no telemetry forks
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    sampler = Sampler(proc.pid, t0, interval)
    sampler.start()
    _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    samples = sampler.samples
    lm_ir = export / "openvino_language_model.bin"
    return dict(
        mode=mode,
        returncode=proc.returncode,
        wall_s=round(wall, 1),
        peak_gib=round(max((_peak(s) for s in samples), default=0) / GIB, 3),
        peak_anon_gib=round(max((s.anon or 0 for s in samples), default=0) / GIB, 3),
        lm_fp16_gb=round(lm_ir.stat().st_size / GB, 3),
        export_gb=round(dir_bytes(export) / GB, 3),
        output_gb=round(dir_bytes(out) / GB, 3) if proc.returncode == 0 else None,
        stderr_tail=stderr.decode("utf-8", "replace")[-1500:],
    )


def analyse(runs: list[dict], target: int, ram_gib: float) -> dict:
    """Per mode: the linear fit of peak memory and LM size over layers, extrapolated to `target`."""
    out = {}
    for mode in sorted({r["mode"] for r in runs}):
        ok = [r for r in runs if r["mode"] == mode and r["returncode"] == 0]
        if len({r["layers"] for r in ok}) < 2:
            continue
        xs = [r["layers"] for r in ok]
        a, b = linear_fit(xs, [r["peak_gib"] for r in ok])
        la, lb = linear_fit(xs, [r["lm_fp16_gb"] for r in ok])
        aa, ab = linear_fit(xs, [r["peak_anon_gib"] for r in ok])
        out[mode] = dict(peak_a_gib=round(a, 3), peak_per_layer_gib=round(b, 4),
                         extrapolated_peak_gib=round(a + b * target, 2),
                         extrapolated_anon_gib=round(aa + ab * target, 2),
                         extrapolated_lm_fp16_gb=round(la + lb * target, 2),
                         fits_in_ram=a + b * target < ram_gib)  # fmt: skip
    return dict(target_layers=target, machine_ram_gib=round(ram_gib, 1), modes=out)


def markdown(runs: list[dict], analysis: dict) -> str:
    """The measured runs and the extrapolation as markdown tables."""
    lines = ["| decoder layers | LM mode | fp16 LM IR (GB) | peak memory (GiB) | of which anonymous (GiB) | time (s) | "
             "output export (GB) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        lines.append(f"| {r['layers']} | {r['mode']} | {r['lm_fp16_gb']:.2f} | {r['peak_gib']:.2f} | "
                     f"{r['peak_anon_gib']:.2f} | {r['wall_s']:.0f} | "
                     f"{r['output_gb'] if r['output_gb'] is not None else 'failed'} |")  # fmt: skip
    lines += ["", f"| LM mode | peak = a + b·layers | extrapolated to {analysis['target_layers']} layers (GiB) | "
                  f"anonymous at {analysis['target_layers']} layers (GiB, extrapolated) | "
                  f"fp16 LM IR at {analysis['target_layers']} layers (GB) | fits {analysis['machine_ram_gib']} GiB |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for mode, m in analysis["modes"].items():
        lines.append(f"| {mode} | {m['peak_a_gib']:.2f} + {m['peak_per_layer_gib']:.3f}·L | "
                     f"**{m['extrapolated_peak_gib']:.1f}** (extrapolated) | {m['extrapolated_anon_gib']:.1f} | "
                     f"{m['extrapolated_lm_fp16_gb']:.1f} | "
                     f"{'yes' if m['fits_in_ram'] else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--modes", nargs="+", default=["int4_sym", "int8"])
    parser.add_argument("--exports", type=Path, default=Path("artifacts/bench"))
    parser.add_argument("--checkpoints", type=Path, default=Path("artifacts/memory-scaling"))
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts/compress-memory"))
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--render", type=Path, help="print the tables of an earlier --json file; run nothing")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.render.read_text())
        analysis = analyse(saved["runs"], REAL_LAYERS, saved["analysis"]["machine_ram_gib"])
        print(markdown(saved["runs"], analysis))
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for layers in args.layers:
        export = ensure_export(layers, args.exports, args.checkpoints, args.work_dir)
        for mode in args.modes:
            out = args.work_dir / f"compressed-{layers}L-{mode}"
            print(f"compressing {layers} layers to {mode} ...", file=sys.stderr, flush=True)
            run = dict(layers=layers, **compress_once(export, out, mode, args.interval))
            shutil.rmtree(out, ignore_errors=True)
            print(f"  peak {run['peak_gib']:.2f} GiB, {run['wall_s']:.0f} s, exit {run['returncode']}",
                  file=sys.stderr, flush=True)  # fmt: skip
            runs.append(run)
    analysis = analyse(runs, REAL_LAYERS, psutil.virtual_memory().total / GIB)
    print(markdown(runs, analysis))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(runs=runs, analysis=analysis), indent=2) + "\n")


if __name__ == "__main__":
    main()
