#!/usr/bin/env python
"""Measurements of the engine that the docs quote (not part of the test suite).

    python scripts/engine_checks.py slow-path   EXPORT [--image IMG] [--runs 3]
    python scripts/engine_checks.py long-prompt EXPORT [--lengths 2000,4000,8000,12000]
    python scripts/engine_checks.py interleaved EXPORT [--image IMG] [--image2 IMG]
    python scripts/engine_checks.py many-images EXPORT [--images 8]
    python scripts/engine_checks.py chunk-size  EXPORT [--budgets 128,256,512,2048]
    python scripts/engine_checks.py decode-precision EXPORT [--image IMG] [--tokens 32]

slow-path:   TTFT of an image prompt on a cold engine vs right after an unrelated short request
             (the old stateful path's 2.2x slow path), for the engine and the stateful path.
long-prompt: prefill time and peak RSS growth of text prompts of increasing length (linear?).
interleaved: two conversations over the HTTP server taking turns, 3 turns each, an image in
             turn 1: TTFT of every turn (turns 2-3 should find their prefix cached).
many-images: 8 large images in one request, and 16 concurrent requests: RSS against model + pool.
chunk-size:  single-stream TTFT of one image prompt per --max-step-tokens budget.
decode-precision: single-stream TTFT and TPOT with decode steps on the main compilation vs the f32
             decode variant (--decode-precision f32), interleaved on one pipeline, and the anonymous
             memory after one answer with each setting (each in a fresh process).
Every timing is mean ± std over --runs after one warm-up; the machine's CPU flags are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from llava_ov.tools.measure import RssSampler, current_rss, machine_info
from llava_ov.runtime.settings import LoadSettings
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Pipeline

ONE = GenerationConfig(max_new_tokens=1)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def stat(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def slow_path(args) -> dict:
    out = {}
    for kind in ("paged", "stateful"):
        pipe = Pipeline(args.export, kv_cache=kind, kv_cache_gb=args.kv_gb)
        cold, after = [], []
        for i in range(args.runs + 1):
            pipe.clear_caches()
            pipe.prepare_image(args.image)  # image features cached: time the language model only
            pipe.reset()
            c = pipe.generate("Describe this image.", [args.image], ONE).timings.ttft_s
            pipe.reset()
            pipe.generate("hi", config=ONE)  # an unrelated short request leaves a short prefix behind
            a = pipe.generate("Describe this image.", [args.image], ONE).timings.ttft_s
            if i:
                cold.append(c)
                after.append(a)
        out[kind] = {"cold_s": stat(cold), "after_short_s": stat(after),
                     "ratio": statistics.fmean(after) / statistics.fmean(cold)}  # fmt: skip
        pipe.close()
        print(kind, out[kind], flush=True)
    return out


def long_prompt(args) -> dict:
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa " * 4000).split()
    out: dict = {}
    for kind in ("paged", "stateful"):
        pipe = Pipeline(args.export, kv_cache=kind, kv_cache_gb=args.kv_gb, max_step_tokens=args.budget)
        out[kind] = {}
        for length in [int(n) for n in args.lengths.split(",")]:
            pipe.clear_caches()
            pipe.generate("hi", config=ONE)  # a short request before, as on a server
            base = current_rss()
            with RssSampler() as sampler:
                result = pipe.generate(" ".join(words[:length]), config=ONE)
            t = result.timings.ttft_s
            out[kind][length] = {"prompt_tokens": result.prompt_tokens, "ttft_s": round(t, 3),
                                 "ms_per_token": round(1e3 * t / result.prompt_tokens, 3),
                                 "rss_growth_mb": round((sampler.peak - base) / 2**20, 1)}  # fmt: skip
            print(kind, length, out[kind][length], flush=True)
        pipe.close()
    return out


def interleaved(args) -> dict:
    import base64

    import httpx

    from load_test import start_server  # scripts/ is on sys.path when run as a script

    proc, base = start_server(args.export, [])
    try:
        urls = [f"data:image/jpeg;base64,{base64.b64encode(Path(p).read_bytes()).decode()}"
                for p in (args.image, args.image2)]  # fmt: skip
        chats = [[{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                                {"type": "image_url", "image_url": {"url": u}}]}] for u in urls]  # fmt: skip
        follow = ["Tell me more about it.", "What colours stand out?"]
        out = {0: [], 1: []}
        with httpx.Client(timeout=600) as client:
            for turn in range(3):
                for who in (0, 1):
                    start = time.perf_counter()
                    with client.stream("POST", f"{base}/v1/chat/completions",
                                       json={"messages": chats[who], "max_tokens": 16, "stream": True}) as r:  # fmt: skip
                        text, ttft = "", None
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                                if delta and ttft is None:
                                    ttft = time.perf_counter() - start
                                text += delta
                    out[who].append(round(ttft, 3))
                    chats[who] += [{"role": "assistant", "content": text}]
                    if turn < 2:
                        chats[who].append({"role": "user", "content": follow[turn]})
                    print(f"user {who} turn {turn + 1}: TTFT {ttft:.3f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return {f"user{w}": {"ttft_s": t, "turns_2_3_over_1": [round(x / t[0], 3) for x in t[1:]]} for w, t in out.items()}


def many_images(args) -> dict:
    from PIL import Image

    pipe = Pipeline(args.export, kv_cache_gb=args.kv_gb or None)
    pool_mb = pipe.engine.pool.num_blocks * pipe.engine.lm.bytes_per_block / 2**20
    loaded = current_rss() / 2**20
    big = []
    for i in range(args.images):
        path = Path(f"/tmp/engine-check-{i}.png")
        Image.open(args.image).convert("RGB").resize((1008, 672)).rotate(i * 7).save(path)
        big.append(path)
    from llava_ov.runtime.pipeline import Message

    from llava_ov.errors import LlavaOvError

    with RssSampler() as sampler:
        try:
            result = pipe.generate([Message("user", "Compare these pictures.", big)], config=ONE)
            one_request = {"prompt_tokens": result.prompt_tokens}
        except LlavaOvError as exc:  # e.g. larger than the whole pool: refused before it runs
            one_request = {"refused": str(exc)}
    one_request["peak_rss_mb"] = round(sampler.peak / 2**20)
    print("one request", one_request, flush=True)
    results: list = [None] * 16
    with RssSampler() as sampler:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, pipe.generate(f"Question {i}: what is this?", [big[i % len(big)]], GenerationConfig(max_new_tokens=16))))
            for i in range(16)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    concurrent = {"completed": sum(r is not None for r in results), "peak_rss_mb": round(sampler.peak / 2**20),
                  "preemptions": pipe.engine.stats()["preemptions"]}  # fmt: skip
    print("16 concurrent", concurrent, flush=True)
    return {"rss_after_load_mb": round(loaded), "kv_pool_mb": round(pool_mb), "eight_images": one_request,
            "sixteen_concurrent": concurrent}  # fmt: skip


def chunk_size(args) -> dict:
    out = {}
    stateful = Pipeline(args.export, kv_cache="stateful")
    pipes = {"stateful": stateful}
    for budget in [int(n) for n in args.budgets.split(",")]:
        pipes[f"paged-{budget}"] = Pipeline(args.export, kv_cache_gb=args.kv_gb, max_step_tokens=budget)
    times = {name: [] for name in pipes}
    for i in range(args.runs + 1):
        for name, pipe in pipes.items():  # interleaved
            pipe.clear_caches()
            pipe.prepare_image(args.image)
            pipe.reset()
            t = pipe.generate("Describe this image.", [args.image], ONE).timings.ttft_s
            if i:
                times[name].append(t)
    for name, values in times.items():
        out[name] = stat(values)
        print(name, out[name], flush=True)
    return out


def anonymous_memory(args) -> dict:
    """RssAnon after loading with --decode and answering once (weights are repacked on first use)."""
    pipe = Pipeline(args.export, decode_precision=args.decode, kv_cache_gb=args.kv_gb)
    pipe.generate("Describe this image.", [args.image], GenerationConfig(max_new_tokens=4))
    status = Path("/proc/self/status").read_text().splitlines()
    kib = next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
    return {"decode_precision": args.decode, "rss_anon_gib": round(kib / 2**20, 2)}


def decode_precision(args) -> dict:
    import subprocess

    memory = {}
    for precision in ("same", "f32"):
        cmd = [sys.executable, __file__, "anonymous-memory", args.export, "--image", args.image, "--decode", precision]
        if args.kv_gb is not None:
            cmd += ["--kv-gb", str(args.kv_gb)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[precision] = json.loads(proc.stdout)["result"]["rss_anon_gib"]
        print("anonymous memory", precision, memory[precision], "GiB", flush=True)
    pipe = Pipeline(args.export, decode_precision="f32", kv_cache_gb=args.kv_gb)
    lm = pipe.model.paged
    variant_tokens = lm.decode_tokens
    config = GenerationConfig(max_new_tokens=args.tokens, ignore_eos=True)
    times: dict[str, dict[str, list[float]]] = {k: {"ttft_s": [], "tpot_ms": []} for k in ("main", "f32-decode")}
    for i in range(args.runs + 1):
        for name, tokens in (("main", 0), ("f32-decode", variant_tokens)):  # interleaved
            lm.decode_tokens = tokens  # 0: no step is small enough for the variant
            pipe.clear_caches()
            t = pipe.generate("Describe this image.", [args.image], config).timings
            if i:
                times[name]["ttft_s"].append(t.ttft_s)
                times[name]["tpot_ms"].append(t.tpot_s * 1000)
    out = {"rss_anon_gib": memory, "tokens": args.tokens}
    for name, values in times.items():
        out[name] = {key: stat(v) for key, v in values.items()}
        print(name, out[name], flush=True)
    tpot = {name: statistics.fmean(v["tpot_ms"]) for name, v in times.items()}
    out["tpot_main_over_variant"] = round(tpot["main"] / tpot["f32-decode"], 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("check", choices=["slow-path", "long-prompt", "interleaved", "many-images", "chunk-size",
                                     "decode-precision", "anonymous-memory"])  # fmt: skip
    p.add_argument("export")
    p.add_argument("--image", default=str(EXAMPLES / "cat.jpg"))
    p.add_argument("--image2", default=str(EXAMPLES / "rocket.jpg"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--lengths", default="2000,4000,8000,12000")
    p.add_argument("--budget", type=int, default=LoadSettings().max_step_tokens)
    p.add_argument("--budgets", default="128,256,512,2048")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--kv-gb", type=float, default=None)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per answer (decode-precision)")
    p.add_argument("--decode", default="same", choices=["same", "f32"], help="(anonymous-memory)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    fn = {"slow-path": slow_path, "long-prompt": long_prompt, "interleaved": interleaved,
          "many-images": many_images, "chunk-size": chunk_size, "decode-precision": decode_precision,
          "anonymous-memory": anonymous_memory}[args.check]  # fmt: skip
    report = {"check": args.check, "machine": machine_info(), "result": fn(args)}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
