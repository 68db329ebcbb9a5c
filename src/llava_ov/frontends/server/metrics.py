"""Prometheus metrics in the text exposition format (0.0.4), without prometheus_client.

`ServerMetrics` holds the server's counters, histograms and gauges (thread-safe:
the generation worker records into them) and renders `/metrics`;
`MetricsMiddleware` counts every HTTP response by path and status.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs)
    return "{" + text + "}" if text else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.label_names)
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(str(labels[n]) for n in self.label_names), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self.values.items())
        if not self.label_names and not items:
            items = [((), 0.0)]
        lines += [f"{self.name}{_labels(zip(self.label_names, key))} {_number(v)}" for key, v in items]
        return lines


class Gauge:
    """A value read at scrape time from a function."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_number(self.read())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # last: above every bucket
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            counts, total = list(self.counts), self.sum
        running = 0
        for bound, n in zip((*self.buckets, math.inf), counts):
            running += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_number(total)}", f"{self.name}_count {running}"]
        return lines


class ServerMetrics:
    """All metrics of one server instance."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0, running: Callable[[], float] = lambda: 0,
                 ready: Callable[[], float] = lambda: 0, engine: Callable[[], dict] = dict):  # fmt: skip
        p = "llava_ov_"
        self.requests = Counter(p + "http_requests_total", "HTTP responses by path and status.", ("path", "status"))
        self.errors = Counter(p + "http_errors_total", "HTTP error responses (status >= 400) by status.", ("status",))
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens processed (image tokens included).")
        self.completion_tokens = Counter(p + "completion_tokens_total", "Tokens generated.")
        self.cached_tokens = Counter(p + "prefix_cached_tokens_total", "Prompt tokens found in the prefix cache.")
        self.proposed_tokens = Counter(p + "proposed_tokens_total", "Tokens proposed for verification (jump-forward, prompt lookup).")
        self.accepted_tokens = Counter(p + "accepted_tokens_total", "Proposed tokens kept: each one a forward saved.")
        self.generations = Counter(
            p + "generations_total", "Finished generations by finish reason.", ("finish_reason",)
        )
        self.dropped = Counter(p + "dropped_requests_total", "Queued requests dropped because the client left.")
        self.queue_wait = Histogram(
            p + "queue_wait_seconds", "Time from accepting a request to the engine starting it (image work included).", LATENCY_BUCKETS
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "From accepting a request to its first token (queue wait included).",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.tpot = Histogram(
            p + "time_per_output_token_seconds", "Time of each generated token after the first.", TOKEN_BUCKETS
        )
        self.gauges = [
            Gauge(p + "queue_depth", "Requests accepted beyond what the engine runs at once (max_queue bounds it).",
                  queue_depth),
            Gauge(p + "requests_running", "Requests the engine is computing (prefilling or decoding).", running),
            Gauge(p + "model_ready", "1 once the model is loaded.", ready),
            Gauge(p + "kv_blocks_used", "KV cache blocks held by running sequences.",
                  lambda: engine().get("blocks_used", 0)),
            Gauge(p + "kv_blocks_total", "KV cache blocks in the pool.", lambda: engine().get("blocks_total", 0)),
            Gauge(p + "engine_preemptions", "Sequences paused for lack of KV blocks so far.",
                  lambda: engine().get("preemptions", 0)),
        ]  # fmt: skip

    def record_result(self, result: Any) -> None:
        """Count one finished generation (a `GenerationResult`)."""
        self.generations.inc(finish_reason=result.finish_reason)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(len(result.token_ids))
        self.cached_tokens.inc(result.cached_tokens)
        self.proposed_tokens.inc(result.proposed_tokens)
        self.accepted_tokens.inc(result.accepted_tokens)
        for seconds in result.timings.token_s:
            self.tpot.observe(seconds)

    def render(self) -> str:
        parts = [self.requests, self.errors, self.prompt_tokens, self.completion_tokens, self.cached_tokens,
                 self.proposed_tokens, self.accepted_tokens, self.generations, self.dropped, self.queue_wait,
                 self.ttft, self.tpot, *self.gauges]  # fmt: skip
        return "\n".join(line for metric in parts for line in metric.render()) + "\n"


class MetricsMiddleware:
    """ASGI middleware counting responses by (known) path and status."""

    def __init__(self, app: Any, metrics: ServerMetrics, paths: Callable[[], set[str]]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if the app fails before starting a response

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope["path"] if scope["path"] in self.paths() else "other"  # bounded label values
            self.metrics.requests.inc(path=path, status=str(status))
            if status >= 400:
                self.metrics.errors.inc(status=str(status))
