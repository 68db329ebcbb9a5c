"""Batch captioning: one prompt (or one per row) over many images, resumable.

`llava-ov batch MODEL INPUT -o OUTPUT` reads a folder of images or a
CSV/JSONL/Parquet table of image paths/URLs, answers every row with the same
`Pipeline.generate` the other front ends use, and writes one result per row to
JSONL or Parquet.  Owns: answering rows, keeping `--in-flight N` rows in the
engine at once (threads in one process over one model; a single writer) and the
end-of-job summary; reading inputs into
`Row`s and the crash-safe output sinks (a rerun skips rows already done; a crash
loses at most the rows in flight) are in `llava_ov.frontends.batch.files`.  Image URLs are fetched by `llava_ov.runtime.fetch` (the server's
safe fetcher) with batch limits.  `llava_ov.frontends.batch.on_ray` runs the same rows on
Ray Data.  See docs/batch.md.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llava_ov.frontends.batch.files import DEFAULT_PROMPT, Row, is_url, open_sink, read_rows
from llava_ov.runtime.constrained import parse_answer
from llava_ov.errors import InvalidImageError, LlavaOvError
from llava_ov.runtime.fetch import FetchPolicy, fetch_url
from llava_ov.runtime.video import InvalidVideoError

VIDEO_FETCH_BYTES = 64 * 1024 * 1024
from llava_ov.runtime.settings import LoadSettings

# ----------------------------------------------------------------------------- images from URLs


@dataclass(frozen=True)
class FetchOptions(FetchPolicy):
    """The shared `llava_ov.runtime.fetch.FetchPolicy` with batch defaults: 20 MB, 20 s, at most 5 redirects."""

    max_bytes: int = 20_000_000
    fetch_timeout_s: float = 20.0
    max_redirects: int = 5


def load_source(row: Row, options: FetchOptions) -> str | bytes:
    """What to hand the pipeline for a row's image: a local path, or the bytes fetched from its URL."""
    if not row.source:
        raise InvalidImageError("the row has no image")
    return fetch_url(row.source, options) if is_url(row.source) else row.source


def load_video(row: Row, options: FetchOptions) -> str | bytes:
    """A row's video: a local path, or the bytes fetched from its URL (the video limits: VIDEO_FETCH)."""
    if not is_url(row.video_source):
        return row.video_source
    policy = replace(options, what="video", accept="video/*", max_bytes=max(options.max_bytes, VIDEO_FETCH_BYTES))
    try:
        return fetch_url(row.video_source, policy)
    except InvalidImageError as exc:  # the shared fetcher's refusals
        raise InvalidVideoError(str(exc)) from None


def row_inputs(row: Row, options: FetchOptions) -> tuple[list, list]:
    """(images, videos) of a row; a row with neither is an error."""
    if not row.source and not row.video_source:
        raise InvalidImageError("the row has no image and no video")
    images = [load_source(row, options)] if row.source else []
    videos = [load_video(row, options)] if row.video_source else []
    return images, videos


# ----------------------------------------------------------------------------- one row


@dataclass(frozen=True)
class PipelineSpec:
    """How to load a Pipeline in another process (worker or Ray actor): an export and its load settings."""

    model_dir: str
    settings: LoadSettings = field(default_factory=LoadSettings)

    def with_threads(self, threads: int | None) -> PipelineSpec:
        """The same spec pinning OpenVINO's CPU threads (one worker of several shares the cores)."""
        props = self.settings.properties
        if not threads or self.settings.device.upper() != "CPU" or "INFERENCE_NUM_THREADS" in props:
            return self
        pinned = replace(self.settings, properties={**props, "INFERENCE_NUM_THREADS": int(threads)})
        return replace(self, settings=pinned)

    def load(self):
        from llava_ov.runtime.pipeline import Pipeline

        return Pipeline(self.model_dir, self.settings)


def caption_row(pipe, row: Row, config, fetch: FetchOptions = FetchOptions(), cancel=None) -> dict[str, Any]:
    """Answer one row; any failure becomes an error record instead of an exception."""
    start = time.perf_counter()
    try:
        images, videos = row_inputs(row, fetch)
        result = pipe.generate(row.prompt, images, config, cancel=cancel, videos=videos)
    except LlavaOvError as e:
        return error_record(row, str(e), time.perf_counter() - start)
    except Exception as e:  # e.g. an OpenVINO runtime error: record it, keep the job going
        return error_record(row, f"{type(e).__name__}: {e}", time.perf_counter() - start)
    t = result.timings
    parsed, error = None, None
    if config.json_schema is not None:
        parsed, error = parse_answer(result.text, result.finish_reason, len(result.token_ids))
        error = error and f"{error}; then rerun with --retry-errors"  # a cut answer is an error row: redo only those
    return {
        "id": row.id, "image": row.image, "video": row.video, "prompt": row.prompt, "answer": result.text,
        "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.token_ids),
        "timings": {"ttft_s": t.ttft_s, "tpot_s": t.tpot_s, "total_s": time.perf_counter() - start},
        "json": parsed, "error": error,
    }  # fmt: skip


def error_record(row: Row, message: str, total_s: float) -> dict[str, Any]:
    return {
        "id": row.id, "image": row.image, "video": row.video, "prompt": row.prompt, "answer": None,
        "finish_reason": "error",
        "prompt_tokens": None, "completion_tokens": None,
        "timings": {"ttft_s": None, "tpot_s": None, "total_s": total_s}, "json": None, "error": message,
    }  # fmt: skip


# ----------------------------------------------------------------------------- running


@dataclass
class BatchSummary:
    total: int
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # already done by an earlier run
    skipped_errors: int = 0  # of those, rows recorded with an error (rerun them with retry_errors)
    elapsed_s: float = 0.0
    interrupted: bool = False
    output: str = ""

    @property
    def rows_per_s(self) -> float:
        done = self.succeeded + self.failed
        return done / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def exit_code(self) -> int:
        """130 interrupted, 1 if any row of the input has an error in the output, else 0."""
        return 130 if self.interrupted else 1 if self.failed or self.skipped_errors else 0

    def line(self) -> str:
        state = "interrupted (rerun the same command to resume)" if self.interrupted else "done"
        earlier = f", {self.skipped_errors} of them with errors" if self.skipped_errors else ""
        return (
            f"batch {state}: {self.total} rows: {self.succeeded} ok, {self.failed} failed, "
            f"{self.skipped} skipped (already done{earlier}) in {self.elapsed_s:.1f} s "
            f"({self.rows_per_s:.2f} rows/s) -> {self.output}"
        )


def run_batch(
    model: Any,
    input_path: str | Path,
    output: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    config=None,
    in_flight: int = 4,
    settings: LoadSettings | None = None,
    columns: dict[str, str | None] | None = None,
    fetch: FetchOptions = FetchOptions(),
    retry_errors: bool = False,
    progress: bool = True,
) -> BatchSummary:
    """Caption every row of `input_path` into `output` (.jsonl or .parquet), skipping rows already there.

    `model` is an export directory, a `PipelineSpec` or a loaded `Pipeline`; `in_flight`
    rows are in the engine at once (they decode together in one forward, so rows finish
    out of order).  `settings` load an export directory (default: `LoadSettings()`).
    `columns` maps "image"/"prompt"/"id" to table column names.  Ctrl-C stops
    the job with `summary.interrupted` set; everything written so far is kept.
    """
    from llava_ov.runtime.generate import GenerationConfig

    config = config or GenerationConfig()
    config.validate()
    if in_flight < 1:
        raise LlavaOvError("--in-flight must be >= 1")
    cols = columns or {}
    rows = read_rows(input_path, prompt, cols.get("image"), cols.get("prompt"), cols.get("id"), cols.get("video"))
    spec = _as_spec(model, settings)
    sink = open_sink(Path(output).expanduser())
    results = functools.partial(_results, model, spec, config, fetch, in_flight)
    return _run(rows, sink, results, retry_errors, progress)


def _as_spec(model: Any, settings: LoadSettings | None) -> PipelineSpec | None:
    """The spec to load `model` from; None for an already loaded Pipeline."""
    if isinstance(model, PipelineSpec):
        return model
    if hasattr(model, "generate") and hasattr(model, "reset"):
        return None
    return PipelineSpec(str(model), settings or LoadSettings())


def _results(model, spec, config, fetch, in_flight: int, todo: list[Row]) -> Iterator[dict[str, Any]]:
    """The result records of `todo`, `in_flight` rows at a time in the engine (in completion order)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pipe = model if spec is None else _load_with_warnings(spec)
    pipe.constraint(config)  # an unusable schema, regex or grammar stops the job before any row
    rows, stop = iter(todo), threading.Event()
    answer = functools.partial(caption_row, pipe, config=config, fetch=fetch, cancel=stop)
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="llava-ov-batch") as pool:
        pending = {pool.submit(answer, row) for row in itertools.islice(rows, in_flight)}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
                    pending.update(pool.submit(answer, row) for row in itertools.islice(rows, 1))
        finally:
            stop.set()  # rows still running stop at their next step; their results are not written


def _load_with_warnings(spec: PipelineSpec):
    from tqdm import tqdm

    pipe = spec.load()
    for warning in pipe.warnings():
        tqdm.write(f"warning: {warning}", file=sys.stderr)  # above the progress bar, not inside it
    return pipe


def _run(rows: list[Row], sink, results: Callable[[list[Row]], Iterator[dict]], retry_errors, progress):
    """Skip done rows, write every new result as it arrives, count, and finish the sink."""
    started = time.perf_counter()
    done = sink.open(retry_errors)
    todo = [row for row in rows if row.id not in done]
    summary = BatchSummary(total=len(rows), skipped=len(rows) - len(todo), output=str(sink.path))
    summary.skipped_errors = sum(1 for row in rows if done.get(row.id, {}).get("error"))
    bar = _progress_bar(len(todo), progress and bool(todo))
    finished = False
    try:
        with _logs_above(bar):
            for record in results(todo) if todo else ():
                sink.write(record)
                summary.failed += record["error"] is not None
                summary.succeeded += record["error"] is None
                bar.update(1)
                bar.set_postfix(failed=summary.failed, refresh=False)
        finished = True
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        sink.close([row.id for row in rows] if finished else None)
        summary.elapsed_s = time.perf_counter() - started
    return summary


def _logs_above(bar) -> Any:
    """While the bar shows, log records print above it (not into its line)."""
    if bar.disable:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="row", desc="batch", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
