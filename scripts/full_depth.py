#!/usr/bin/env python
"""A model at full depth: build, convert, compress and bench a random llava-v1.6-mistral-7b (32 layers), or any
shipped config with --config (e.g. llava-onevision-qwen2-0.5b-ov-hf, 24 layers, --compare transformers).

Builds a random-weight checkpoint with the real llava-v1.6-mistral-7b-hf dimensions and all
32 decoder layers (fp16 safetensors shards, ~15 GB, streamed shard by shard), then runs each
step below as a fresh subprocess under a memory probe (RSS + children's private memory every
0.25 s, anonymous / file-backed split at the peak, ru_maxrss) and records wall time, peak
memory, disk used and output sizes:

  build         the checkpoint (llava_ov.exporting.random_models, streamed=True)
  first-run     `llava-ov run CKPT --image ... --prompt ...`: convert + default INT4 + an answer
                (optionally inside a cgroup with a memory limit: --limit first-run=16)
  convert-fp16  `llava-ov convert CKPT --weight-format fp16`
  int4          `llava-ov compress FP16 --lm int4_sym` (default: g64, ratio 0.6)
  int8          `llava-ov compress FP16 --lm int8`
  vision-ptq    `llava-ov compress FP16 --lm none --vision int8_ptq` (default calibration size)
  int4-awq      `llava-ov compress FP16 --awq` (--awq-samples prompts)
  bench-int4    `llava-ov bench INT4 --compare genai` (TTFT, TPOT, bandwidth share)
  bench-int8    the same on the INT8 export

Not part of the test suite (hours on a 2-core machine; ~60 GB of disk at the peak). Each finished step
is kept in --work-dir/results.json and skipped on a rerun; --steps picks a subset.

    python scripts/full_depth.py --work-dir /data/full-depth
    python scripts/full_depth.py --work-dir /data/full-depth --steps first-run --cold --limit first-run=16 \\
        --suffix=-cold-16gib
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_memory_scaling import GIB, Sampler, _peak  # noqa: E402  (the same probe as the scaling study)

CONFIG_NAME = "llava-v1.6-mistral-7b-hf"
STEPS = ("build", "first-run", "convert-fp16", "int4", "int8", "bench-int4", "bench-int8", "vision-ptq", "int4-awq")
DISPOSABLE = ("first-run", "vision-ptq", "int4-awq")  # outputs no later step reads: deleted once measured
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")  # cgroup v1; v2 is handled by memory.max below


def dir_gb(path: Path) -> float | None:
    if not path.exists():
        return None
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9, 3)


def disk_free_gb(path: Path) -> float:
    return round(shutil.disk_usage(path).free / 1e9, 2)


def build_checkpoint(out: Path, layers: int, config: str = CONFIG_NAME) -> None:
    from llava_ov.exporting.random_models import RandomModelSpec, build_random_checkpoint

    spec = RandomModelSpec(config, scale="real", text_layers=layers, initializer_range=0.02)
    build_random_checkpoint(spec, out, dtype="float16", streamed=True)


def memory_cgroup(limit_gib: float | None, name: str) -> Path | None:
    """A memory cgroup (v1 or v2) limited to `limit_gib`, or None (no limit asked / not possible)."""
    if not limit_gib:
        return None
    limit = str(int(limit_gib * GIB))
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    try:
        if v2.exists():
            group = Path(f"/sys/fs/cgroup/llava-full-depth-{name}")
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(limit)
            (group / "memory.swap.max").write_text("0")
        else:
            group = CGROUP_ROOT / f"llava-full-depth-{name}"
            group.mkdir(exist_ok=True)
            (group / "memory.limit_in_bytes").write_text(limit)
        return group
    except OSError as exc:
        print(f"cannot make a {limit_gib} GiB memory cgroup ({exc}); running without a limit", file=sys.stderr)
        return None


def cgroup_peak_gib(group: Path | None) -> float | None:
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        if group and (group / name).exists():
            return round(int((group / name).read_text()) / GIB, 3)
    return None


def run_step(name: str, cmd: list[str], work: Path, env: dict | None = None, group: Path | None = None,
             interval: float = 0.25) -> dict:  # fmt: skip
    """Run `cmd`, sampling its memory; returns the step's record (log in work/NAME.log)."""
    log = work / f"{name}.log"
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    free_before = disk_free_gb(work)

    def enter_cgroup() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                preexec_fn=enter_cgroup)  # fmt: skip
        sampler = Sampler(proc.pid, t0, interval)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    code = os.waitstatus_to_exitcode(status)
    samples = sampler.samples
    at_peak = max(samples, key=_peak) if samples else None
    record = {
        "step": name,
        "command": cmd,
        "returncode": code,
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_gib": round(_peak(at_peak) / GIB, 3) if at_peak else None,
        "peak_anon_gib": round(at_peak.anon / GIB, 3) if at_peak and at_peak.anon is not None else None,
        "peak_file_gib": round(at_peak.file / GIB, 3) if at_peak and at_peak.file is not None else None,
        "max_anon_gib": round(max((x.anon or 0 for x in samples), default=0) / GIB, 3),
        "ru_maxrss_gib": round(usage.ru_maxrss * 1024 / GIB, 3),
        "cgroup_peak_gib": cgroup_peak_gib(group),
        "disk_used_gb": round(free_before - disk_free_gb(work), 3),
        "timeline": timeline(samples),
        "log": str(log),
        "log_tail": log.read_text(errors="replace")[-2000:],
    }
    print(f"[{name}] exit {code}, {record['wall_s']} s, peak {record['peak_gib']} GiB", file=sys.stderr, flush=True)
    return record


def timeline(samples, step_s: float = 2.0) -> list[tuple[float, float | None, float | None]]:
    """(seconds, anonymous GiB, file-backed GiB) every `step_s`."""
    out, last = [], -step_s
    for x in samples:
        if x.t - last >= step_s:
            out.append((round(x.t, 1), x.anon and round(x.anon / GIB, 2), x.file and round(x.file / GIB, 2)))
            last = x.t
    return out


def drop_page_cache() -> bool:
    """Start a step cold (its reads are charged to its own cgroup); needs root. False where not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def plan(work: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Step name -> command, output folder and extra options."""
    cli = [sys.executable, "-m", "llava_ov.cli"]
    ckpt, fp16 = work / f"ckpt-{args.layers}L", work / "export-fp16"
    photo = str(args.image)
    prompt = "Describe this image in detail."
    return {
        "build": {"cmd": [sys.executable, __file__, "--build-into", str(ckpt), "--layers", str(args.layers),
                          "--config", args.config],
                  "out": ckpt},
        "first-run": {"cmd": [*cli, "run", str(ckpt), "--image", photo, "--prompt", prompt, "--max-new-tokens", "16",
                              "-v"],
                      "out": work / "home", "env": {"LLAVA_OV_HOME": str(work / "home")}},
        "convert-fp16": {"cmd": [*cli, "convert", str(ckpt), "-o", str(fp16), "--weight-format", "fp16",
                                 "--overwrite"], "out": fp16},
        "int4": {"cmd": [*cli, "compress", str(fp16), "-o", str(work / "export-int4"), "--overwrite"],
                 "out": work / "export-int4"},
        "int8": {"cmd": [*cli, "compress", str(fp16), "-o", str(work / "export-int8"), "--lm", "int8", "--overwrite"],
                 "out": work / "export-int8"},
        "vision-ptq": {"cmd": [*cli, "compress", str(fp16), "-o", str(work / "export-vision-ptq"), "--lm", "none",
                               "--vision", "int8_ptq", "--overwrite"], "out": work / "export-vision-ptq"},
        "int4-awq": {"cmd": [*cli, "compress", str(fp16), "-o", str(work / "export-int4-awq"), "--awq",
                             "--calib-samples", str(args.awq_samples), "--overwrite"], "out": work / "export-int4-awq"},
        "bench-int4": {"cmd": [*cli, "bench", str(work / "export-int4"), "--image", photo, "--compare", args.compare,
                               "--runs", str(args.bench_runs), "--max-new-tokens", "32",
                               "--json", str(work / "bench-int4.json")], "out": None},
        "bench-int8": {"cmd": [*cli, "bench", str(work / "export-int8"), "--image", photo, "--compare", args.compare,
                               "--runs", str(args.bench_runs), "--max-new-tokens", "32",
                               "--json", str(work / "bench-int8.json")], "out": None},
    }  # fmt: skip


def machine() -> dict:
    from llava_ov.common.hardware import matrix_flags

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {"cpu": model, "cores": os.cpu_count(), "ram_gib": round(total / GIB, 1), "cpu_flags": matrix_flags()}


def markdown(results: dict[str, dict]) -> str:
    rows = ["| step | exit | wall (s) | CPU (s) | peak RSS (GiB) | anon / file at peak (GiB) | max anon (GiB) | "
            "cgroup peak (GiB) | output (GB) | disk used (GB) |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        if name == "machine":
            continue
        rows.append(f"| {name} | {r['returncode']} | {r['wall_s']} | {r['cpu_s']} | {r['peak_gib']} | "
                    f"{r['peak_anon_gib']} / {r['peak_file_gib']} | {r.get('max_anon_gib', '')} | {r.get('cgroup_peak_gib') or ''} | "
                    f"{r.get('output_gb') or ''} | {r['disk_used_gb']} |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("full-depth"))
    parser.add_argument("--steps", default=",".join(STEPS), help="comma list of steps to run (finished ones are kept)")
    parser.add_argument("--config", default=CONFIG_NAME, help="shipped config folder (llava_ov/model_configs)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's own count)")
    parser.add_argument("--compare", default="genai", help="engines bench compares with (genai, transformers)")
    parser.add_argument("--image", type=Path, default=None, help="photo for first-run and bench (default: astronaut)")
    parser.add_argument("--limit", action="append", default=[], metavar="STEP=GIB",
                        help="run STEP in a memory cgroup of GIB (e.g. first-run=16); with --cold, what it reads is "
                             "charged to it")  # fmt: skip
    parser.add_argument("--awq-samples", type=int, default=32)
    parser.add_argument("--bench-runs", type=int, default=3)
    parser.add_argument("--keep-outputs", action="store_true",
                        help=f"keep the outputs of {', '.join(DISPOSABLE)} (deleted once measured: ~25 GB)")
    parser.add_argument("--suffix", default="", help="record the steps as STEP+SUFFIX (keeps earlier records)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each step (root only)")
    parser.add_argument("--redo", action="store_true", help="run the chosen steps again even if recorded")
    parser.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers is None:
        from llava_ov.exporting.random_models import model_config_dir

        text = json.loads((model_config_dir(args.config) / "config.json").read_text())["text_config"]
        args.layers = int(text.get("num_hidden_layers", 32))  # Llama's default when the config leaves it out
    if args.build_into:
        build_checkpoint(args.build_into, args.layers, args.config)
        return 0
    if args.image is None:
        import skimage

        args.image = Path(skimage.__file__).parent / "data" / "astronaut.png"
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["machine"] = machine()
    steps = plan(work, args)
    limits = {step: float(gib) for step, gib in (item.split("=", 1) for item in args.limit)}
    for name in args.steps.split(","):
        if name not in steps:
            raise SystemExit(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
        key = name + args.suffix
        if key in results and results[key]["returncode"] == 0 and not args.redo:
            continue
        step = steps[name]
        cold = args.cold and drop_page_cache()
        group = memory_cgroup(limits.get(name), name)
        record = run_step(name, step["cmd"], work, step.get("env"), group)
        record["page_cache_dropped"] = cold
        if group is not None:
            record["memory_limit_gib"] = limits[name]
        if step["out"] is not None:
            record["output_gb"] = dir_gb(step["out"])
            if name in DISPOSABLE and not args.keep_outputs:
                shutil.rmtree(step["out"], ignore_errors=True)
        results[key] = record
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
