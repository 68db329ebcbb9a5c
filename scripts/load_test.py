#!/usr/bin/env python
"""Bounded load test of a llava-ov server (or any OpenAI-compatible one) on loopback.

C concurrent clients send R chat requests in total (httpx + asyncio); the script
reports throughput, latency percentiles (and time to first token with
--stream), status counts and the server's RSS before and after.

    python scripts/load_test.py --model models/demo --clients 32 --requests 200
    python scripts/load_test.py --url http://127.0.0.1:8000 --image examples/cat.jpg --stream

With --model it starts `llava-ov serve` on a free port, waits for /health and
stops it afterwards; with --url it measures a running server (RSS from --pid,
or from the process listening on the URL's port).

--mix cycles every client through four kinds of request: text JSON, image JSON,
image streaming, and image streaming whose client disconnects after the first
chunk; a prober hits /health every 0.2 s throughout and reports its slowest answer.

--hostile N adds N attackers for the whole run, each cycling through HOSTILE: headers
trickled a byte at a time, a 128 KiB header, a body that stops half way, an image whose
header declares 13000x13000 pixels, a one-bit 6000x6000 PNG (48 KB that decode to 108 MB:
accepted and answered), a 28 MB body of 800,000 messages, a lone surrogate, a body nested
100,000 levels deep, a response_format schema nested 100,000 levels deep (and one 80 deep:
valid JSON, too deep a schema), eight one-bit 6000x6000 PNGs in one request (288 Mpx
declared) and sixteen; the report counts what each got back and its slowest answer.

--idle N keeps N connections open for the whole run that send part of a request head and
then nothing, reopening each one the server closes (at its header deadline, or to make room
for a new client); the report says how many it opened and the server's RSS with them open.
The server's RSS is sampled with every /health probe (peak in the report).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

HOSTILE = ("slow-headers", "huge-header", "slow-body", "declared-bomb", "heavy-image", "big-json", "surrogate",
           "deep-json", "deep-schema", "deep-schema-80", "many-images", "too-many-images")


@dataclass
class Outcome:
    status: int | str  # HTTP status, or the client error's name
    latency_s: float
    ttft_s: float | None = None  # streaming only
    tokens: int = 0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered), max(1, -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def request_body(prompt: str, image: str | None, max_tokens: int, stream: bool) -> dict[str, Any]:
    content: Any = prompt
    if image:
        data = base64.b64encode(Path(image).read_bytes()).decode()
        image_part = {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}}
        content = [{"type": "text", "text": prompt}, image_part]
    body = {"model": "any", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


MIX = ("text-json", "image-json", "image-stream", "image-disconnect")


def mix_body(kind: str, prompt: str, image: str, max_tokens: int) -> dict[str, Any]:
    body = request_body(prompt, None if kind == "text-json" else image, max_tokens, kind.endswith(("stream", "disconnect")))
    if kind == "image-disconnect":
        body["disconnect"] = True  # not sent: the client leaves after the first chunk
    return body


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Outcome:
    start = time.perf_counter()
    leave = body.pop("disconnect", False)
    try:
        if not body["stream"]:
            response = await client.post(url, json=body)
            tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
            return Outcome(response.status_code, time.perf_counter() - start, tokens=tokens)
        ttft, tokens = None, 0
        async with client.stream("POST", url, json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if ttft is None and any(c["delta"].get("content") for c in event.get("choices", [])):
                    ttft = time.perf_counter() - start
                    if leave:
                        return Outcome("disconnected", time.perf_counter() - start, ttft)
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        return Outcome(response.status_code, time.perf_counter() - start, ttft, tokens)
    except httpx.HTTPError as exc:
        return Outcome(type(exc).__name__, time.perf_counter() - start)


async def drive(base: str, clients: int, requests: int, bodies, api_key: str | None, hostile: int = 0,
                pid: int | None = None, kinds: tuple[str, ...] = HOSTILE) -> dict[str, Any]:  # fmt: skip
    """Run `requests` requests (body i from `bodies(i)`) over `clients` connections, probing /health and the
    server's RSS (and with `hostile` attackers alongside).

    Returns outcomes, wall seconds, health probe latencies, failed probes, RSS samples and the hostile report."""
    todo = iter(range(requests))
    outcomes: list[Outcome] = []
    probes: list[float] = []
    rss: list[float] = []
    failed_probes = 0
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients)
    done = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in todo:  # shared iterator: each request is taken by exactly one client
            outcomes.append(await one_request(client, f"{base}/v1/chat/completions", bodies(i)))

    async def prober() -> None:
        nonlocal failed_probes
        async with httpx.AsyncClient(timeout=10) as probe:
            while not done.is_set():
                start = time.perf_counter()
                try:
                    ok = (await probe.get(f"{base}/health")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                probes.append(time.perf_counter() - start)
                failed_probes += not ok
                if pid is not None:
                    rss.append(server_rss_mb(pid))
                await asyncio.sleep(0.2)

    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        watch = asyncio.create_task(prober())
        attack = asyncio.create_task(attackers(base, hostile, done, kinds)) if hostile else None
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
        done.set()
        await watch
        return {"outcomes": outcomes, "wall": wall, "probes": probes, "failed_probes": failed_probes, "rss": rss,
                "hostile": await attack if attack is not None else {}}  # fmt: skip


def idle_flood(base: str, count: int, stop: Any, ready: Any, report: Any) -> None:
    """In a process of its own (so its reconnections never delay the prober's event loop): `count`
    connections that each send part of a request head and then nothing, reopened whenever the server closes
    one, until `stop` is set; `ready` is set once all are open; puts (opened, refused) on `report`."""
    asyncio.run(_flood(urlsplit(base), count, stop, ready, report))


async def _flood(url: Any, count: int, stop: Any, ready: Any, report: Any) -> None:
    opened, refused, first_open = 0, 0, 0

    async def hold() -> None:
        nonlocal opened, refused, first_open
        first = True
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(url.hostname, url.port)
            except OSError:
                refused += 1
                await asyncio.sleep(0.5)
                continue
            opened += 1
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            if first:
                first, first_open = False, first_open + 1
                if first_open == count:
                    ready.set()
            while not stop.is_set():  # until the server closes it
                try:
                    if await asyncio.wait_for(reader.read(100), 0.5) == b"":
                        break
                except asyncio.TimeoutError:
                    continue
                except OSError:
                    break
            writer.close()

    await asyncio.gather(*(hold() for _ in range(count)), return_exceptions=True)
    report.put((opened, refused))


class IdleFlood:
    """`idle_flood` in a spawned process, for the length of a `with` block: the report of what it did."""

    def __init__(self, base: str, count: int, pid: int | None):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.stop, self.ready, self.queue = context.Event(), context.Event(), context.Queue()
        self.process = context.Process(target=idle_flood, args=(base, count, self.stop, self.ready, self.queue))
        self.count, self.pid, self.report = count, pid, {}

    def __enter__(self) -> "IdleFlood":
        self.process.start()
        all_open = self.ready.wait(120)
        time.sleep(1.0)  # the server has taken them all in
        rss = server_rss_mb(self.pid) if self.pid is not None else None
        self.report = {"connections": self.count, "all_open": all_open, "rss_mb_all_open": rss and round(rss, 1)}
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        opened, refused = self.queue.get(timeout=60)
        self.process.join(30)
        self.report.update(opened=opened, refused=refused)


def _png_data_url(size: tuple[int, int]) -> str:
    """A one-bit black PNG of `size` as a data URL (tiny on the wire)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", size).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def hostile_payloads() -> dict[str, bytes]:
    """The request bodies of the hostile kinds that send whole requests."""

    def image_body(url: str, count: int = 1) -> bytes:
        images = [{"type": "image_url", "image_url": {"url": url}}] * count
        content = [{"type": "text", "text": "What is this?"}, *images]
        return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 4}).encode()

    def schema_body(depth: int) -> bytes:
        schema = '{"type": "array", "items": ' * depth + '{"type": "string"}' + "}" * depth
        return (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "response_format": '
                b'{"type": "json_schema", "json_schema": {"name": "deep", "schema": %s}}}' % schema.encode())

    heavy = _png_data_url((6000, 6000))
    return {
        "declared-bomb": image_body(_png_data_url((13000, 13000))),
        "heavy-image": image_body(heavy),
        "big-json": json.dumps({"messages": [{"role": "user", "content": "hi"}] * 800_000}).encode(),
        "surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
        "deep-json": b'{"messages": [{"role": "user", "content": "hi"}], "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "deep-schema": schema_body(100_000),
        "deep-schema-80": schema_body(80),
        "many-images": image_body(heavy, 8),
        "too-many-images": image_body(heavy, 16),
    }


async def raw_exchange(host: str, port: int, chunks: list[bytes], pause_s: float) -> tuple[str, float]:
    """Send `chunks` with `pause_s` between them on a raw connection; (status line or 'closed', seconds)."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            try:
                line = await asyncio.wait_for(reader.readline(), pause_s)
            except asyncio.TimeoutError:
                continue
            return (line.decode(errors="replace").split(" ")[1] if line else "closed"), time.perf_counter() - start
        line = await asyncio.wait_for(reader.readline(), 120)
        return (line.decode(errors="replace").split(" ")[1] if line else "closed"), time.perf_counter() - start
    except (ConnectionError, asyncio.IncompleteReadError):
        return "closed", time.perf_counter() - start
    finally:
        writer.close()


async def hostile_once(kind: str, base: str, payloads: dict[str, bytes], client: httpx.AsyncClient) -> tuple[str, float]:
    """One hostile request of `kind`: (what came back, seconds)."""
    url = urlsplit(base)
    if kind == "slow-headers":
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 600
        return await raw_exchange(url.hostname, url.port, [head[i : i + 1] for i in range(len(head))], 0.5)
    if kind == "huge-header":
        return await raw_exchange(url.hostname, url.port, [b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " +
                                                            b"a" * 128 * 1024 + b"\r\n\r\n"], 5)  # fmt: skip
    if kind == "slow-body":
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n{\"messages\": [")  # fmt: skip
        return await raw_exchange(url.hostname, url.port, [head], 120)
    start = time.perf_counter()
    try:
        response = await client.post(f"{base}/v1/chat/completions", content=payloads[kind],
                                     headers={"content-type": "application/json"})  # fmt: skip
        return str(response.status_code), time.perf_counter() - start
    except httpx.HTTPError as exc:
        return type(exc).__name__, time.perf_counter() - start


async def attackers(base: str, count: int, done: asyncio.Event, kinds: tuple[str, ...] = HOSTILE) -> dict[str, dict[str, Any]]:
    """`count` attackers cycling through `kinds` until `done`; per kind, the statuses and slowest answer."""
    payloads = await asyncio.to_thread(hostile_payloads)
    seen: dict[str, Counter] = {k: Counter() for k in kinds}
    slowest: dict[str, float] = dict.fromkeys(kinds, 0.0)

    async def attacker(offset: int, client: httpx.AsyncClient) -> None:
        i = offset
        while True:  # at least one attempt each, then until the load is done
            kind = kinds[i % len(kinds)]
            status, seconds = await hostile_once(kind, base, payloads, client)
            seen[kind][status] += 1
            slowest[kind] = max(slowest[kind], seconds)
            i += 1
            if done.is_set():
                return

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(attacker(i, client) for i in range(count)))
    return {k: {"statuses": dict(seen[k]), "slowest_s": round(slowest[k], 2)} for k in kinds if seen[k]}


def server_rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def listening_pid(base: str) -> int | None:
    """The pid of the process listening on the URL's port (loopback servers of this user)."""
    import psutil

    port = urlsplit(base).port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


def run(
    base: str, clients: int = 32, requests: int = 200, max_tokens: int = 16, prompt: str = "Describe the picture.",
    image: str | list[str] | None = None, stream: bool = False, api_key: str | None = None, pid: int | None = None,
    mix: bool = False, hostile: int = 0, idle: int = 0, kinds: tuple[str, ...] = HOSTILE,
) -> dict:  # fmt: skip
    """One load test against a running server; returns the report dict."""
    pid = pid or (listening_pid(base) if urlsplit(base).hostname in ("127.0.0.1", "localhost") else None)
    rss_before = server_rss_mb(pid)
    images = [image] if isinstance(image, str) else list(image or [])
    if mix:
        if not images:
            raise SystemExit("--mix needs --image")
        pick = lambda i: images[(i // len(MIX)) % len(images)]  # noqa: E731
        bodies = lambda i: mix_body(MIX[i % len(MIX)], prompt, pick(i), max_tokens)  # noqa: E731
    else:
        body = request_body(prompt, images[0] if images else None, max_tokens, stream)
        bodies = lambda i: dict(body)  # noqa: E731
    flood = IdleFlood(base, idle, pid) if idle else contextlib.nullcontext()
    with flood:
        got = asyncio.run(drive(base, clients, requests, bodies, api_key, hostile, pid, kinds))
    outcomes, wall, probes, failed_probes = got["outcomes"], got["wall"], got["probes"], got["failed_probes"]
    time.sleep(2)  # let the server release what the last requests held
    ok = [o for o in outcomes if o.status == 200]
    latencies = [o.latency_s for o in ok]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    report = {
        "clients": clients, "requests": len(outcomes), "images": len(images), "wall_s": round(wall, 3),
        "statuses": dict(Counter(o.status for o in outcomes)),
        "throughput_rps": round(len(ok) / wall, 2), "tokens_per_s": round(sum(o.tokens for o in ok) / wall, 1),
        "latency_s": {f"p{q}": round(percentile(latencies, q), 3) for q in (50, 90, 99)},
        "rss_mb_before": rss_before and round(rss_before, 1), "rss_mb_after": pid and round(server_rss_mb(pid), 1),
        "rss_mb_peak": round(max(got["rss"]), 1) if got["rss"] else None,
        "health": {"probes": len(probes), "failed": failed_probes, "max_s": round(max(probes, default=0.0), 3),
                   "p50_s": round(percentile(probes, 50), 4)},
    }  # fmt: skip
    if ttfts:
        report["ttft_s"] = {f"p{q}": round(percentile(ttfts, q), 3) for q in (50, 90, 99)}
    if got["hostile"]:
        report["hostile"] = got["hostile"]
    if idle:
        report["idle"] = flood.report
    return report


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`llava-ov serve MODEL` on a free loopback port, once /health says ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llava_ov.cli", "serve", model, "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready")


def markdown_row(report: dict, label: str) -> str:
    lat, ttft = report["latency_s"], report.get("ttft_s", {})
    ttft_text = f"{ttft['p50']:.3f} / {ttft['p99']:.3f}" if ttft else "–"
    return (f"| {label} | {report['clients']} | {report['requests']} | {report['throughput_rps']:.2f} | "
            f"{report['tokens_per_s']:.1f} | {lat['p50']:.3f} / {lat['p90']:.3f} / {lat['p99']:.3f} | {ttft_text} | "
            f"{report['statuses']} | {report['rss_mb_before']} → {report['rss_mb_after']} |")  # fmt: skip


def hostile_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = set(kinds) - set(HOSTILE)
    if unknown or not kinds:
        raise SystemExit(f"unknown hostile kinds {sorted(unknown)}; choose from {', '.join(HOSTILE)}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", help="start `llava-ov serve MODEL` for the test")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for llava-ov serve (repeatable)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt", default="Describe the picture.")
    p.add_argument("--image", action="append", default=[],
                   help="send this image (data URL) with every request; repeat it to rotate images with --mix")  # fmt: skip
    p.add_argument("--stream", action="store_true", help="stream answers (measures time to first token)")
    p.add_argument("--mix", action="store_true", help="text/image, JSON/stream and disconnecting clients (needs --image)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole test (RSS after each: flat?)")
    p.add_argument("--hostile", type=int, default=0, help="attackers alongside the load (slow clients, bombs)")
    p.add_argument("--hostile-kinds", default=",".join(HOSTILE), help="which attacks, comma-separated (default: all)")
    p.add_argument("--idle", type=int, default=0, help="idle connections (part of a head, then nothing) held open")
    p.add_argument("--api-key", default=os.environ.get("LLAVA_OV_API_KEY"))
    p.add_argument("--pid", type=int, default=None, help="server process for RSS (default: found from the port)")
    p.add_argument("--label", default="", help="first column of the markdown row")
    args = p.parse_args(argv)
    proc, base = start_server(args.model, args.serve_arg) if args.model else (None, args.url)
    reports = []
    try:
        for _ in range(args.rounds):
            reports.append(run(base, args.clients, args.requests, args.max_tokens, args.prompt, args.image,
                               args.stream, args.api_key, args.pid or (proc.pid if proc else None), args.mix,
                               args.hostile, args.idle, hostile_kinds(args.hostile_kinds)))  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    for report in reports:
        print(json.dumps(report, indent=2))
    for report in reports:
        print(markdown_row(report, args.label or ("mix" if args.mix else "stream" if args.stream else "json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
