#!/usr/bin/env python
"""Time to first token of N concurrent image requests through `llava-ov serve`, side by side.

Starts one server per source tree given (`--tree NAME=SRC_DIR`: the `src` folder of a checkout,
put first on PYTHONPATH), all on loopback, then runs R rounds; in each round every server (in
alternating order) gets N streaming chat requests at once, each with an image it has never seen
(a photo with one pixel changed per round, so the image-feature and prefix caches miss, as for N
different users), and with `--text-requests M` M text-only requests sent `--text-delay` s later
(arriving while the images are being encoded: before, they waited for a global lock). Reported
per tree: TTFT of each request (client side: request sent to first content delta), mean ± std
over rounds of the mean and the slowest image-request TTFT and of the mean text-request TTFT,
and the ratios between trees measured in the same run. `--tree-arg NAME=FLAG` adds a `serve`
flag to one tree only (e.g. `--tree-arg two=--vision-requests=2` with the same SRC twice).

    python scripts/server_image_concurrency.py --model EXPORT --tree before=../old/src --tree after=src \
        --concurrency 4 --rounds 3 --out artifacts/server-images.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "horse.png", "camera.png")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photos(count: int) -> list[Image.Image]:
    """Real photos shipped in scikit-image, as RGB."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    names = [n for n in PHOTOS if (folder / n).exists()]
    return [Image.open(folder / names[i % len(names)]).convert("RGB") for i in range(count)]


def fresh_image(base: Image.Image, round_no: int, slot: int) -> str:
    """A data URL of `base` with one pixel set from (round, slot): new content, same size."""
    arr = np.array(base)
    arr[0, 0] = [round_no % 256, slot % 256, 7]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(model: str, src: str, port: int, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(src).resolve()), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "llava_ov.cli", "serve", model, "--port", str(port), "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become healthy in {timeout:.0f} s")


async def one_request(client: httpx.AsyncClient, url: str, image: str | None, max_tokens: int,
                      delay: float = 0.0, text: str = "Describe this image.") -> float:  # fmt: skip
    """Seconds from sending the request (after `delay`) to its first content delta; no image: text only."""
    await asyncio.sleep(delay)
    content: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image}})
    body = {"model": "m", "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip
    started, ttft = time.perf_counter(), None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():  # read to the end: the next round starts clean
            if ttft is None and line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - started
    if ttft is None:
        raise RuntimeError("the stream ended without content")
    return ttft


async def one_round(url: str, images: list[str], texts: int, text_delay: float, round_no: int,
                    max_tokens: int) -> tuple[list[float], list[float]]:  # fmt: skip
    """(image requests' TTFTs, text requests' TTFTs) of one round sent together."""
    async with httpx.AsyncClient(timeout=600) as client:
        image_calls = [one_request(client, url, im, max_tokens) for im in images]
        text_calls = [one_request(client, url, None, max_tokens, text_delay, f"Say a word about the number {round_no * 100 + i}.")
                      for i in range(texts)]  # fmt: skip
        done = await asyncio.gather(*image_calls, *text_calls)
    return list(done[: len(images)]), list(done[len(images) :])


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="export directory")
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=SRC", help="a checkout's src folder")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag (repeatable)")
    parser.add_argument("--tree-arg", action="append", default=[], metavar="NAME=FLAG", help="a flag for one tree")
    parser.add_argument("--text-requests", type=int, default=0, help="text-only requests sent with each round")
    parser.add_argument("--text-delay", type=float, default=1.0, help="seconds after the image requests")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    servers = {}
    try:
        for name, src in trees.items():
            port = free_port()
            extra = [*args.server_arg, *(f.split("=", 1)[1] for f in args.tree_arg if f.split("=", 1)[0] == name)]
            servers[name] = (f"http://127.0.0.1:{port}", start_server(args.model, src, port, extra))
        for url, proc in servers.values():
            wait_healthy(url, proc)
        bases = photos(args.concurrency)
        results: dict[str, list[list[float]]] = {name: [] for name in trees}
        text_results: dict[str, list[list[float]]] = {name: [] for name in trees}
        for round_no in range(args.rounds + 1):
            order = list(trees) if round_no % 2 == 0 else list(reversed(list(trees)))
            for name in order:
                images = [fresh_image(b, round_no, i) for i, b in enumerate(bases)]
                ttfts, text_ttfts = asyncio.run(one_round(servers[name][0], images, args.text_requests,
                                                          args.text_delay, round_no, args.max_tokens))  # fmt: skip
                label = "warm-up" if round_no == 0 else f"round {round_no}"
                print(f"{label} {name}: TTFT " + " ".join(f"{t:.2f}" for t in sorted(ttfts)) + " s"
                      + (" | text " + " ".join(f"{t:.2f}" for t in sorted(text_ttfts)) if text_ttfts else ""),
                      flush=True)  # fmt: skip
                if round_no:
                    results[name].append(ttfts)
                    text_results[name].append(text_ttfts)
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    report = {"concurrency": args.concurrency, "rounds": args.rounds, "trees": {}}
    for name, rounds in results.items():
        report["trees"][name] = {
            "ttft_s": rounds, "mean_ttft_s": summary([statistics.fmean(r) for r in rounds]),
            "slowest_ttft_s": summary([max(r) for r in rounds]), "fastest_ttft_s": summary([min(r) for r in rounds]),
        }  # fmt: skip
        if args.text_requests:
            report["trees"][name]["text_ttft_s"] = text_results[name]
            report["trees"][name]["mean_text_ttft_s"] = summary([statistics.fmean(r) for r in text_results[name]])
        t = report["trees"][name]
        print(f"{name}: mean TTFT {t['mean_ttft_s']['mean']:.2f} ± {t['mean_ttft_s']['std']:.2f} s, "
              f"slowest {t['slowest_ttft_s']['mean']:.2f} ± {t['slowest_ttft_s']['std']:.2f} s"
              + (f", text {t['mean_text_ttft_s']['mean']:.2f} ± {t['mean_text_ttft_s']['std']:.2f} s"
                 if args.text_requests else ""))  # fmt: skip
    names = list(trees)
    for other in names[1:]:
        a, b = report["trees"][names[0]], report["trees"][other]
        ratio = a["mean_ttft_s"]["mean"] / b["mean_ttft_s"]["mean"]
        slow = a["slowest_ttft_s"]["mean"] / b["slowest_ttft_s"]["mean"]
        report[f"{names[0]}/{other}"] = {"mean_ttft": ratio, "slowest_ttft": slow}
        print(f"{names[0]}/{other}: mean TTFT {ratio:.2f}x, slowest TTFT {slow:.2f}x")
        if args.text_requests:
            text = a["mean_text_ttft_s"]["mean"] / b["mean_text_ttft_s"]["mean"]
            report[f"{names[0]}/{other}"]["mean_text_ttft"] = text
            print(f"{names[0]}/{other}: text-request TTFT {text:.2f}x")
    if args.out:
        from llava_ov.common.hardware import matrix_flags

        report["cpu_flags"] = matrix_flags()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
