#!/usr/bin/env python
"""Peak memory of `llava-ov convert` versus decoder depth, extrapolated to the real 7B model.

Builds random-weight llava-v1.6-mistral-7b checkpoints with the real dimensions
(CLIP ViT-L/336 with 24 layers, 4096-wide Mistral decoder layers, 32064-token
vocabulary) and 2, 4, 8 decoder layers, stored in fp16 as on the Hub (once, into
--work-dir; reused when present); then runs
`python -m llava_ov.cli convert CKPT -o OUT --weight-format fp16 --overwrite`
once per model in a fresh subprocess, one at a time, and records:

- peak memory: the converter's RSS plus the private memory of its children,
  sampled every ~50 ms (psutil + /proc). The children are short-lived forks made
  by OpenVINO's telemetry; the plain RSS sum over the tree ("tree RSS sum", also
  recorded) counts the parent's copy-on-write pages once per fork and overstates;
- the converter's anonymous / file-backed RSS split (file-backed: the memory-mapped
  safetensors weights, which the kernel can drop and re-read under pressure);
- ru_maxrss of that child (os.wait4) and getrusage(RUSAGE_CHILDREN).ru_maxrss
  (the running maximum over every child this script has waited for);
- wall and CPU time, checkpoint and export size on disk;
- per phase (parsed from the converter's `[convert k/n] ...` stderr lines, time-
  stamped as they arrive): start, duration, peak, growth, RSS and its split at the end.

Then fits peak = a + b * layers by least squares and extrapolates to 32 layers.
Prints markdown tables; --json writes everything, memory timelines included.

    python scripts/convert_memory_scaling.py --json artifacts/memory-scaling/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

GIB = 1024**3
GB = 1e9
CONFIG_NAME = "llava-v1.6-mistral-7b-hf"
REAL_LAYERS = 32
REAL_WEIGHTS_GB = 15.1  # llava-v1.6-mistral-7b-hf fp16 safetensors on the Hub (7.57 B parameters)
BUILT_MARKER = ".built"
PHASE_RE = re.compile(r"\[convert (\d+)/(\d+)\] (.*?) \.\.\.")


@dataclass
class Phase:
    index: int
    name: str
    start_s: float
    end_s: float | None = None
    peak_gib: float = 0.0  # converter RSS + children's private memory, peak within the phase
    growth_gib: float = 0.0  # that peak minus the converter RSS when the phase started
    end_rss_gib: float = 0.0  # converter RSS when the phase ended
    end_anon_gib: float | None = None  # ... of which anonymous memory (heap, OpenVINO constants, copies)
    end_file_gib: float | None = None  # ... and file-backed pages (memory-mapped safetensors, libraries)


@dataclass
class Run:
    layers: int
    checkpoint_gb: float
    build_s: float | None
    build_peak_rss_gib: float | None
    telemetry: bool = True
    returncode: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system CPU time of the converter (less sensitive to other load than wall time)
    peak_gib: float = 0.0  # max over samples of converter RSS + children's private memory
    peak_main_rss_gib: float = 0.0  # max RSS of the converter process alone
    peak_tree_rss_gib: float = 0.0  # max RSS summed over the process tree (counts forks' shared pages again)
    peak_anon_gib: float | None = None  # max anonymous RSS of the converter over the run
    main_anon_at_peak_gib: float | None = None
    main_file_at_peak_gib: float | None = None
    ru_maxrss_child_gib: float = 0.0
    ru_maxrss_children_cum_gib: float = 0.0
    forked_children: int = 0
    export_gb: float = 0.0
    phases: list[Phase] = field(default_factory=list)
    timeline: list[tuple[float, float, float]] = field(default_factory=list)  # (s, main RSS, tree RSS) GiB, thinned
    stderr_tail: str = ""


# ---------------------------------------------------------------- sampling


@dataclass
class Sample:
    t: float  # seconds since the conversion started
    tree: int  # RSS summed over the process tree (the converter and any children)
    main: int  # RSS of the converter process alone
    anon: int | None  # its anonymous / file-backed RSS (None where /proc is not readable)
    file: int | None
    children_private: int  # private (not shared with the parent) memory of its children
    children: int


def _proc_fields(pid: int, name: str) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _kib(fields: dict[str, str], *keys: str) -> int | None:
    try:
        return sum(int(fields[k].split()[0]) for k in keys) * 1024
    except (KeyError, ValueError):
        return None


def sample_tree(root: psutil.Process, t: float) -> Sample | None:
    """One memory sample of `root` and its descendants; None once `root` is gone.

    Children of the converter are forks (OpenVINO's telemetry sends each event from
    a forked process): their RSS counts the parent's copy-on-write pages again, so
    only their private pages are real extra memory.
    """
    try:
        main = root.memory_info().rss
        children = root.children(recursive=True)
    except psutil.Error:
        return None
    if main == 0:  # exited (zombie)
        return None
    status = _proc_fields(root.pid, "status")
    tree, private = main, 0
    for child in children:
        try:
            tree += child.memory_info().rss
        except psutil.Error:
            continue
        private += _kib(_proc_fields(child.pid, "smaps_rollup"), "Private_Clean", "Private_Dirty") or 0
    return Sample(t, tree, main, _kib(status, "RssAnon"), _kib(status, "RssFile"), private, len(children))


class Sampler(threading.Thread):
    """Samples the memory of a process tree every `interval` seconds until stopped."""

    def __init__(self, pid: int, t0: float, interval: float):
        super().__init__(daemon=True)
        self.root, self.t0, self.interval = psutil.Process(pid), t0, interval
        self.samples: list[Sample] = []
        self.child_pids: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            sample = sample_tree(self.root, time.perf_counter() - self.t0)
            if sample is not None:
                self.samples.append(sample)
            try:
                self.child_pids.update(c.pid for c in self.root.children(recursive=True))
            except psutil.Error:
                pass
            self.stop.wait(self.interval)


class PhaseReader(threading.Thread):
    """Reads the converter's stderr, timestamping each `[convert k/n] name ...` line as it appears."""

    def __init__(self, stream, t0: float):
        super().__init__(daemon=True)
        self.stream, self.t0 = stream, t0
        self.text = ""
        self.phases: list[Phase] = []

    def run(self) -> None:
        fd = self.stream.fileno()
        while chunk := os.read(fd, 4096):
            now = time.perf_counter() - self.t0
            seen = len(self.phases)
            self.text += chunk.decode("utf-8", "replace")
            for i, match in enumerate(PHASE_RE.finditer(self.text)):
                if i >= seen:
                    if self.phases:
                        self.phases[-1].end_s = now
                    self.phases.append(Phase(int(match.group(1)), match.group(3), now))


def _peak(sample: Sample) -> int:
    return sample.main + sample.children_private


def attach_phase_memory(phases: list[Phase], samples: list[Sample], end_s: float) -> None:
    """Peak memory within each phase and converter RSS at its end, from the sampled timeline."""
    for phase in phases:
        phase.end_s = phase.end_s if phase.end_s is not None else end_s
        inside = [_peak(s) for s in samples if phase.start_s <= s.t <= phase.end_s]
        before_end = [s for s in samples if s.t <= phase.end_s]
        before_start = [s.main for s in samples if s.t <= phase.start_s]
        phase.peak_gib = round(max(inside, default=0) / GIB, 3)
        phase.growth_gib = round(phase.peak_gib - (before_start[-1] / GIB if before_start else 0.0), 3)
        if before_end:
            last = before_end[-1]
            phase.end_rss_gib, phase.end_anon_gib, phase.end_file_gib = gib(last.main), gib(last.anon), gib(last.file)
        phase.start_s, phase.end_s = round(phase.start_s, 2), round(phase.end_s, 2)


def thin(samples: list[Sample], step_s: float = 0.5) -> list[tuple[float, float, float]]:
    """(seconds, main RSS GiB, tree RSS GiB) at most every `step_s`, keeping the peak samples."""
    keep = {id(max(samples, key=k)) for k in (_peak, lambda s: s.tree)} if samples else set()
    out, last = [], -step_s
    for s in samples:
        if s.t - last >= step_s or id(s) in keep:
            out.append((round(s.t, 2), round(s.main / GIB, 3), round(s.tree / GIB, 3)))
            last = s.t
    return out


def gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 3)


# ---------------------------------------------------------------- building and converting


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_checkpoint(layers: int, out: Path) -> None:
    """Build one checkpoint (run in a child process); random init directly in fp16, no fp32 copy."""
    from llava_ov.exporting.random_models import RandomModelSpec, build_random_checkpoint

    build_random_checkpoint(RandomModelSpec(CONFIG_NAME, scale="real", text_layers=layers), out, dtype="float16")
    (out / BUILT_MARKER).write_text(f"{layers} decoder layers, fp16, {CONFIG_NAME}\n")


def ensure_checkpoint(layers: int, work: Path, interval: float) -> tuple[Path, float | None, float | None]:
    """Checkpoint dir for `layers` (reused if complete), build time and peak RSS when built now."""
    ckpt = work / f"ckpt-{layers}L"
    if (ckpt / BUILT_MARKER).exists():
        print(f"reusing {ckpt}", file=sys.stderr)
        return ckpt, None, None
    shutil.rmtree(ckpt, ignore_errors=True)
    print(f"building {ckpt} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, __file__, "--build-one", str(layers), str(ckpt)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    sampler = Sampler(proc.pid, t0, interval)
    sampler.start()
    code = proc.wait()
    sampler.stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"building the {layers}-layer checkpoint failed (exit {code})")
    peak = max((_peak(s) for s in sampler.samples), default=0) / GIB
    return ckpt, round(time.perf_counter() - t0, 1), round(peak, 3)


def convert_once(ckpt: Path, out: Path, interval: float, telemetry: bool) -> tuple[dict, list[Phase], Sampler, str]:
    """Run the converter CLI in a fresh subprocess, sampling its memory; returns measurements."""
    cmd = [sys.executable, "-m", "llava_ov.cli", "convert", str(ckpt), "-o", str(out),
           "--weight-format", "fp16", "--overwrite"]  # fmt: skip
    # openvino-telemetry (used by ov.convert_model and NNCF) stays off in CI=true environments.
    env = dict(os.environ) if telemetry else {**os.environ, "CI": "true"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    sampler, reader = Sampler(proc.pid, t0, interval), PhaseReader(proc.stderr, t0)
    sampler.start()
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop.set()
    sampler.join()
    reader.join()
    proc.stderr.close()
    attach_phase_memory(reader.phases, sampler.samples, wall)
    measured = summarise(sampler, usage, wall, telemetry, proc.returncode)
    return measured, reader.phases, sampler, reader.text


def summarise(sampler: Sampler, usage: resource.struct_rusage, wall: float, telemetry: bool, code: int) -> dict:
    """The Run fields measured from one conversion's samples and rusage."""
    scale = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: KiB on Linux, bytes on macOS
    samples = sampler.samples or [Sample(0, 0, 0, None, None, 0, 0)]
    at_peak = max(samples, key=lambda s: s.main)
    children_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return dict(
        telemetry=telemetry,
        returncode=code,
        wall_s=round(wall, 1),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
        peak_gib=gib(max(_peak(s) for s in samples)),
        peak_main_rss_gib=gib(at_peak.main),
        peak_tree_rss_gib=gib(max(s.tree for s in samples)),
        peak_anon_gib=gib(max((s.anon for s in samples if s.anon is not None), default=None)),
        main_anon_at_peak_gib=gib(at_peak.anon),
        main_file_at_peak_gib=gib(at_peak.file),
        ru_maxrss_child_gib=round(usage.ru_maxrss * scale / GIB, 3),
        ru_maxrss_children_cum_gib=round(children_maxrss * scale / GIB, 3),
        forked_children=len(sampler.child_pids),
    )


def measure(layers: int, work: Path, interval: float, keep_export: bool, telemetry: bool) -> Run:
    """Build (or reuse) the checkpoint with `layers` decoder layers and measure one conversion."""
    ckpt, build_s, build_peak = ensure_checkpoint(layers, work, interval)
    out = work / f"export-{layers}L"
    avail = psutil.virtual_memory().available / GIB
    print(f"converting {layers} layers ({avail:.1f} GiB available) ...", file=sys.stderr, flush=True)
    measured, phases, sampler, stderr = convert_once(ckpt, out, interval, telemetry)
    run = Run(layers, round(dir_bytes(ckpt) / GB, 3), build_s, build_peak, **measured)
    run.phases, run.timeline, run.stderr_tail = phases, thin(sampler.samples), stderr[-2000:]
    if run.returncode == 0:
        run.export_gb = round(dir_bytes(out) / GB, 3)
    if not keep_export:
        shutil.rmtree(out, ignore_errors=True)
    print(f"  peak {run.peak_gib:.2f} GiB, {run.wall_s:.0f} s, exit {run.returncode}", file=sys.stderr, flush=True)
    return run


# ---------------------------------------------------------------- analysis and report


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares a, b of y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


FIT_KEYS = ("peak_gib", "peak_main_rss_gib", "peak_tree_rss_gib", "ru_maxrss_child_gib", "checkpoint_gb", "cpu_s")


def analyse(runs: list[Run], target: int, ram_gib: float) -> dict:
    """Linear fits over layers extrapolated to `target` layers, and a structural estimate.

    The structural estimate adds what the runs show does not grow with depth (the
    peak anonymous memory, the file-backed pages that are not the checkpoint) to the
    real checkpoint size, since the converter ends up with every weight page mapped.
    """
    ok = [r for r in runs if r.returncode == 0]
    xs = [r.layers for r in ok]
    if len(set(xs)) < 2:
        return {"error": "need successful runs at two or more layer counts to fit"}
    fits = {key: linear_fit(xs, [getattr(r, key) for r in ok]) for key in FIT_KEYS}
    (a, b), (ca, cb) = fits["peak_gib"], fits["checkpoint_gb"]
    peak_t, real_gib = a + b * target, REAL_WEIGHTS_GB * GB / GIB
    result = {
        "fits": {k: {"a": round(fa, 3), "b_per_layer": round(fb, 4), f"at_{target}": round(fa + fb * target, 2)}
                 for k, (fa, fb) in fits.items()},  # fmt: skip
        "target_layers": target,
        "extrapolated_peak_gib": round(peak_t, 2),
        "extrapolated_checkpoint_gb": round(ca + cb * target, 2),
        "real_weights_gb": REAL_WEIGHTS_GB,
        "real_weights_gib": round(real_gib, 2),
        "peak_per_layer_over_weights_per_layer": round(b * GIB / (cb * GB), 2),
        "extrapolated_peak_over_real_weights": round(peak_t / real_gib, 2),
        "machine_ram_gib": round(ram_gib, 1),
        "fits_in_ram": peak_t < ram_gib,
    }
    if all(r.peak_anon_gib is not None and r.main_file_at_peak_gib is not None for r in ok):
        anon = max(r.peak_anon_gib for r in ok)
        other_file = max(r.main_file_at_peak_gib - r.checkpoint_gb * GB / GIB for r in ok)
        result["structural_estimate_gib"] = {
            "anon": round(anon, 2), "other_file": round(other_file, 2), "total": round(anon + other_file + real_gib, 2)
        }  # fmt: skip
    return result


def dominant_phase(run: Run) -> Phase | None:
    """The phase that adds the most memory."""
    return max(run.phases, key=lambda p: p.growth_gib, default=None)


PHASE_LABELS = {"loading": "load", "vision": "vision", "text embeddings": "text embeddings",
                "language model": "language model", "tokenizer": "tokenizers", "config": "config files"}  # fmt: skip


def short(name: str) -> str:
    """A short label for a converter phase name."""
    return next((label for key, label in PHASE_LABELS.items() if key in name), name)


TABLE_HEAD = [
    "| decoder layers | checkpoint (GB) | export (GB) | peak RSS (GiB) | of which file-backed | peak / checkpoint "
    "| ru_maxrss (GiB) | tree RSS sum (GiB) | forks | wall (s) | CPU (s) | phase adding most (GiB) |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
]


def run_row(r: Run) -> str:
    top = dominant_phase(r)
    ratio = r.peak_gib * GIB / (r.checkpoint_gb * GB) if r.checkpoint_gb else 0
    peak = f"{r.peak_gib:.2f}" + ("" if r.returncode == 0 else f" (exit {r.returncode})")
    file_ = "-" if r.main_file_at_peak_gib is None else f"{r.main_file_at_peak_gib:.2f}"
    grew = f"{short(top.name)} (+{top.growth_gib:.2f})" if top else "-"
    cells = [r.layers, f"{r.checkpoint_gb:.2f}", f"{r.export_gb:.2f}", peak, file_, f"{ratio:.2f}x",
             f"{r.ru_maxrss_child_gib:.2f}", f"{r.peak_tree_rss_gib:.2f}", r.forked_children, f"{r.wall_s:.0f}",
             f"{r.cpu_s:.0f}", grew]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def fit_lines(fit: dict) -> list[str]:
    """The extrapolated table row and a sentence on the fit."""
    t, f = fit["target_layers"], fit["fits"]["peak_gib"]
    cells = [f"**{t} (extrapolated)**", f"{fit['extrapolated_checkpoint_gb']:.2f}", "",
             f"**{fit['extrapolated_peak_gib']:.2f}**", "",
             f"{fit['extrapolated_peak_over_real_weights']:.2f}x"]  # fmt: skip
    row = "| " + " | ".join(cells + [""] * 6) + " |"
    text = (
        f"Fit: peak = {f['a']:.2f} GiB + {f['b_per_layer']:.3f} GiB x layers; {t} layers -> "
        f"{fit['extrapolated_peak_gib']:.1f} GiB (extrapolated) against {fit['machine_ram_gib']:.1f} GiB RAM: "
        f"{'fits' if fit['fits_in_ram'] else 'does NOT fit'}. Real {t}-layer weights: {fit['real_weights_gb']} GB "
        f"= {fit['real_weights_gib']} GiB; the peak grows {fit['peak_per_layer_over_weights_per_layer']:.2f}x "
        "the weight bytes per layer."
    )
    if "structural_estimate_gib" in fit:
        s = fit["structural_estimate_gib"]
        text += (f" Structural estimate: {s['anon']:.2f} anonymous + {s['other_file']:.2f} other file-backed "
                 f"+ {fit['real_weights_gib']:.2f} weights = {s['total']:.1f} GiB.")  # fmt: skip
    return [row, "", text]


def markdown(runs: list[Run], fit: dict) -> str:
    """The results table (plus the extrapolated row and the fit) in markdown."""
    lines = TABLE_HEAD + [run_row(r) for r in runs]
    return "\n".join(lines + (fit_lines(fit) if "fits" in fit else []))


def phase_table(run: Run) -> str:
    lines = [f"Phases, {run.layers} layers (telemetry {'on' if run.telemetry else 'off'}):", "",
             "| phase | start (s) | time (s) | peak (GiB) | growth (GiB) | RSS at end (GiB) | anon / file at end |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in run.phases:
        split = "-" if p.end_anon_gib is None else f"{p.end_anon_gib:.2f} / {p.end_file_gib:.2f}"
        lines.append(f"| {short(p.name)} | {p.start_s:.1f} | {p.end_s - p.start_s:.1f} | {p.peak_gib:.2f} "
                     f"| {p.growth_gib:+.2f} | {p.end_rss_gib:.2f} | {split} |")  # fmt: skip
    return "\n".join(lines)


def report(runs: list[Run], target: int, ram_gib: float) -> dict:
    """Print the tables; returns the fit."""
    fit = analyse(runs, target, ram_gib)
    print(markdown(runs, fit))
    for run in runs:
        print("\n" + phase_table(run))
    return fit


def load_runs(path: Path) -> list[Run]:
    """The runs of an earlier --json file."""
    runs = []
    for data in json.loads(path.read_text())["runs"]:
        run = Run(**{k: v for k, v in data.items() if k in Run.__dataclass_fields__})
        run.phases = [Phase(**p) for p in data["phases"]]
        runs.append(run)
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="decoder layer counts (default 2 4 8)")
    p.add_argument("--work-dir", type=Path, default=Path("artifacts/memory-scaling"), help="checkpoints and exports")
    p.add_argument("--json", type=Path, default=None, help="write results (with memory timelines) here")
    p.add_argument("--interval", type=float, default=0.05, help="memory sampling interval in seconds")
    p.add_argument("--target-layers", type=int, default=REAL_LAYERS, help="extrapolate to this many layers")
    p.add_argument("--keep-exports", action="store_true", help="keep the exports (default: measure, then delete)")
    p.add_argument("--no-telemetry", action="store_true", help="run the converter with CI=true (telemetry off)")
    p.add_argument("--from-json", type=Path, default=None, help="print the tables of an earlier --json, run nothing")
    p.add_argument("--build-one", nargs=2, metavar=("LAYERS", "DIR"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_one:
        build_checkpoint(int(args.build_one[0]), Path(args.build_one[1]))
        return 0
    if args.from_json:
        ram = json.loads(args.from_json.read_text())["machine"]["ram_gib"]
        report(load_runs(args.from_json), args.target_layers, ram)
        return 0
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    ram_gib = psutil.virtual_memory().total / GIB
    telemetry = not args.no_telemetry
    runs = [measure(n, work, args.interval, args.keep_exports, telemetry) for n in sorted(args.layers)]
    fit = report(runs, args.target_layers, ram_gib)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        machine = dict(cpus=os.cpu_count(), ram_gib=round(ram_gib, 1), platform=platform.platform(),
                       python=platform.python_version())  # fmt: skip
        payload = dict(config=CONFIG_NAME, machine=machine, fit=fit, runs=[asdict(r) for r in runs])
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(r.returncode == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
