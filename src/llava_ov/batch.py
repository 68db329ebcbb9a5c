"""Batch captioning: one prompt (or one per row) over many images, resumable.

`llava-ov batch MODEL INPUT -o OUTPUT` reads a folder of images or a
CSV/JSONL/Parquet table of image paths/URLs, answers every row with the same
`Pipeline.generate` the other front ends use, and writes one result per row to
JSONL or Parquet.  Owns: reading inputs into `Row`s, the crash-safe output
sinks (a rerun skips rows already done; a crash loses at most the rows in
flight), the `--workers K` process pool (a single writer: the parent) and the
end-of-job summary.  Image URLs are fetched by `llava_ov.fetch` (the server's
safe fetcher) with batch limits.  `llava_ov.ray_batch` runs the same rows on
Ray Data.  See docs/batch.md.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import InvalidImageError, LlavaOvError
from .fetch import FetchPolicy, fetch_url

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TABLE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
DEFAULT_PROMPT = "Describe this image."
JOURNAL_SUFFIX = ".journal.jsonl"
FIELDS = ("id", "image", "prompt", "answer", "finish_reason", "prompt_tokens", "completion_tokens", "timings", "error")


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One unit of work: a stable id, the image as given, where to load it from, and the prompt."""

    id: str
    image: str  # as written in the input (relative path, URL) -- echoed in the output
    source: str  # absolute path or URL to load
    prompt: str


def read_rows(
    input_path: str | Path,
    prompt: str = DEFAULT_PROMPT,
    image_column: str | None = None,
    prompt_column: str | None = None,
    id_column: str | None = None,
) -> list[Row]:
    """The rows of a folder of images or a CSV/JSONL/Parquet table, in a deterministic order."""
    path = Path(input_path).expanduser()
    if path.is_dir():
        rows = folder_rows(path, prompt)
    elif path.is_file():
        rows = table_rows(path, read_table(path), prompt, image_column, prompt_column, id_column)
    else:
        raise LlavaOvError(f"batch input not found: {path}")
    check_unique_ids(rows)
    return rows


def folder_rows(folder: Path, prompt: str) -> list[Row]:
    """Every image file under `folder` (recursive), sorted by relative path; the id is that path."""
    files = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    rows = []
    for p in files:
        rel = p.relative_to(folder).as_posix()
        rows.append(Row(rel, rel, str(p.resolve()), prompt))
    return rows


def read_table(path: Path) -> list[dict[str, Any]]:
    """The records of a CSV (header row), JSONL (one object a line) or Parquet file."""
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise LlavaOvError(f"unsupported batch input {path.name}: give a folder, .csv, .jsonl or .parquet")
    try:
        if kind == "csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                return list(csv.DictReader(f))
        if kind == "jsonl":
            return _read_jsonl_table(path)
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LlavaOvError(f"cannot read {path.name}: {e}") from None
    except Exception as e:  # pyarrow raises ArrowInvalid etc. for a corrupt file
        if isinstance(e, LlavaOvError):
            raise
        raise LlavaOvError(f"cannot read {path.name}: {type(e).__name__}: {e}") from None


def _read_jsonl_table(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlavaOvError(f"{path.name} line {n} is not valid JSON: {e.msg}") from None
        if not isinstance(record, dict):
            raise LlavaOvError(f"{path.name} line {n} is not a JSON object")
        records.append(record)
    return records


def table_rows(
    path: Path,
    records: list[dict[str, Any]],
    prompt: str,
    image_column: str | None,
    prompt_column: str | None,
    id_column: str | None,
) -> list[Row]:
    """Rows from table records; relative image paths are resolved against the table's folder."""
    columns = {k for r in records for k in r}
    image_col = _column(columns, image_column, "image", required=True, path=path)
    prompt_col = _column(columns, prompt_column, "prompt", required=False, path=path)
    id_col = _column(columns, id_column, "id", required=False, path=path)
    rows = []
    for index, record in enumerate(records):
        image = _text(record.get(image_col))
        row_prompt = _text(record.get(prompt_col)) if prompt_col else ""
        row_id = _text(record.get(id_col)) if id_col else str(index)
        if not row_id:
            raise LlavaOvError(f"{path.name} row {index} has an empty {id_col!r}")
        rows.append(Row(row_id, image, resolve_source(image, path.parent), row_prompt or prompt))
    return rows


def _column(columns: set[str], chosen: str | None, default: str, *, required: bool, path: Path) -> str | None:
    """The column to use: the one named by the user (must exist), else `default` if present."""
    if chosen is not None:
        if chosen not in columns:
            raise LlavaOvError(f"{path.name} has no column {chosen!r} (columns: {', '.join(sorted(columns))})")
        return chosen
    if default in columns:
        return default
    if required:
        raise LlavaOvError(
            f"{path.name} has no {default!r} column; name the image column with --image-column "
            f"(columns: {', '.join(sorted(columns)) or 'none'})"
        )
    return None


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def is_url(value: str) -> bool:
    return "://" in value[:16]


def resolve_source(image: str, base: Path) -> str:
    """A URL as is; a path made absolute against `base` (the input table's folder)."""
    if not image or is_url(image):
        return image
    path = Path(image).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def check_unique_ids(rows: list[Row]) -> None:
    """Resuming keys on ids: two rows with one id would make one of them look done."""
    seen: set[str] = set()
    for row in rows:
        if row.id in seen:
            raise LlavaOvError(f"duplicate row id {row.id!r}; ids must be unique (see --id-column)")
        seen.add(row.id)


# ----------------------------------------------------------------------------- images from URLs


@dataclass(frozen=True)
class FetchOptions(FetchPolicy):
    """The shared `llava_ov.fetch.FetchPolicy` with batch defaults: 20 MB, 20 s, at most 5 redirects."""

    max_bytes: int = 20_000_000
    fetch_timeout_s: float = 20.0
    max_redirects: int = 5


def load_source(row: Row, options: FetchOptions) -> str | bytes:
    """What to hand the pipeline for a row's image: a local path, or the bytes fetched from its URL."""
    if not row.source:
        raise InvalidImageError("the row has no image")
    return fetch_url(row.source, options) if is_url(row.source) else row.source


# ----------------------------------------------------------------------------- one row


@dataclass(frozen=True)
class PipelineSpec:
    """How to load a Pipeline in another process (worker or Ray actor)."""

    model_dir: str
    device: str = "CPU"
    properties: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = "default"
    devices: dict[str, str] = field(default_factory=dict)  # per part, as Pipeline(devices=...)
    part_paths: dict[str, str] = field(default_factory=dict)  # per part, as Pipeline(part_paths=...)

    def with_threads(self, threads: int | None) -> "PipelineSpec":
        """The same spec pinning OpenVINO's CPU threads (one worker of several shares the cores)."""
        if not threads or self.device.upper() != "CPU" or "INFERENCE_NUM_THREADS" in self.properties:
            return self
        return replace(self, properties={**self.properties, "INFERENCE_NUM_THREADS": int(threads)})

    def load(self):
        from .pipeline import Pipeline

        return Pipeline(
            self.model_dir, self.device, properties=dict(self.properties), cache_dir=self.cache_dir,
            devices=dict(self.devices), part_paths=dict(self.part_paths),
        )  # fmt: skip


def caption_row(pipe, row: Row, config, fetch: FetchOptions = FetchOptions()) -> dict[str, Any]:
    """Answer one row; any failure becomes an error record instead of an exception."""
    start = time.perf_counter()
    try:
        source = load_source(row, fetch)
        pipe.reset()  # every row from an empty KV cache: answers do not depend on row order or worker
        result = pipe.generate(row.prompt, [source], config)
    except LlavaOvError as e:
        return error_record(row, str(e), time.perf_counter() - start)
    except Exception as e:  # e.g. an OpenVINO runtime error: record it, keep the job going
        return error_record(row, f"{type(e).__name__}: {e}", time.perf_counter() - start)
    t = result.timings
    return {
        "id": row.id, "image": row.image, "prompt": row.prompt, "answer": result.text,
        "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.token_ids),
        "timings": {"ttft_s": t.ttft_s, "tpot_s": t.tpot_s, "total_s": time.perf_counter() - start},
        "error": None,
    }  # fmt: skip


def error_record(row: Row, message: str, total_s: float) -> dict[str, Any]:
    return {
        "id": row.id, "image": row.image, "prompt": row.prompt, "answer": None, "finish_reason": "error",
        "prompt_tokens": None, "completion_tokens": None,
        "timings": {"ttft_s": None, "tpot_s": None, "total_s": total_s}, "error": message,
    }  # fmt: skip


def arrow_schema():
    """The Parquet schema of result records (shared with the Ray path)."""
    import pyarrow as pa

    timings = pa.struct([("ttft_s", pa.float64()), ("tpot_s", pa.float64()), ("total_s", pa.float64())])
    types = [pa.string()] * 5 + [pa.int64(), pa.int64(), timings, pa.string()]
    return pa.schema(list(zip(FIELDS, types)))


# ----------------------------------------------------------------------------- output sinks


class JsonlSink:
    """Append-only JSONL: one line per finished row, flushed and fsynced before the next.

    On open, a trailing partial line (a crash mid-write) is truncated away; the
    ids of complete lines are done.  An exclusive lock keeps a second job off the file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def open(self, retry_errors: bool = False) -> dict[str, dict[str, Any]]:
        """Open for appending; returns the records already written, by id."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        _lock(self._fd, self.path)
        records = self.recover()
        if retry_errors and any(r.get("error") for r in records.values()):
            records = {k: r for k, r in records.items() if not r.get("error")}
            self._rewrite(records.values())
        return records

    def recover(self) -> dict[str, dict[str, Any]]:
        data = _read_all(self._fd)
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut by a crash: drop it, that row runs again
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        records = {}
        for n, line in enumerate(data[:end].splitlines(), 1):
            if line.strip():
                record = _parse_record(line, self.path, n)
                records[record["id"]] = record
        return records

    def _rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        """Atomically replace the file with `records` (temp file + os.replace), then reopen it."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as f:
            f.writelines(_line(r) for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        _lock(self._fd, self.path)

    def write(self, record: dict[str, Any]) -> None:
        os.write(self._fd, _line(record))  # one write of one whole line, then make it durable
        os.fsync(self._fd)

    def close(self, order: list[str] | None = None) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class ParquetSink:
    """Parquet output: rows go to a JSONL journal beside it while the job runs; at the end the
    existing Parquet rows and the journal are written to a temp file and moved into place
    (os.replace), then the journal is deleted.  A crash leaves the journal to resume from."""

    def __init__(self, path: Path):
        self.path = path
        self.journal = JsonlSink(path.with_name(path.name + JOURNAL_SUFFIX))
        self.previous: dict[str, dict[str, Any]] = {}

    def open(self, retry_errors: bool = False) -> dict[str, dict[str, Any]]:
        self.previous = read_parquet_records(self.path) if self.path.exists() else {}
        if retry_errors:
            self.previous = {k: r for k, r in self.previous.items() if not r.get("error")}
        return {**self.previous, **self.journal.open(retry_errors)}

    def write(self, record: dict[str, Any]) -> None:
        self.journal.write(record)

    def close(self, order: list[str] | None = None) -> None:
        """Finish: merge, write atomically, drop the journal.  `order`: ids in input order."""
        if order is None:  # interrupted: keep the journal (unless empty), write nothing
            empty = not self.journal.recover()
            self.journal.close()
            if empty:
                self.journal.remove()
            return
        records = {**self.previous, **self.journal.recover()}
        rank = {row_id: i for i, row_id in enumerate(order)}
        rows = sorted(records.values(), key=lambda r: (rank.get(r["id"], len(rank)), r["id"]))
        write_parquet_atomic(self.path, rows)
        self.journal.close()
        self.journal.remove()


def write_parquet_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(records, schema=arrow_schema()), tmp)
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_parquet_records(path: Path) -> dict[str, dict[str, Any]]:
    """The records of a result Parquet file, by id; a clear error if it is unreadable."""
    import pyarrow.parquet as pq

    try:
        return {r["id"]: r for r in pq.read_table(path).to_pylist()}
    except Exception as e:  # never overwrite results we cannot read
        raise LlavaOvError(f"cannot read existing output {path}: {type(e).__name__}: {e}; move it away") from None


def open_sink(output: Path) -> JsonlSink | ParquetSink:
    suffix = output.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return JsonlSink(output)
    if suffix == ".parquet":
        return ParquetSink(output)
    raise LlavaOvError(f"unsupported batch output {output.name}: use a .jsonl or .parquet file name")


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps({k: record.get(k) for k in FIELDS}, ensure_ascii=False) + "\n").encode()


def _parse_record(line: bytes, path: Path, n: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise LlavaOvError(f"{path} line {n} is corrupt (not JSON); fix or move the file") from None
    if not isinstance(record, dict) or "id" not in record:
        raise LlavaOvError(f"{path} line {n} is not a batch result (no id); is this the right file?")
    return record


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _lock(fd: int, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LlavaOvError(f"another batch job is writing {path}") from None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    workers: int = 1,
    threads: int | None = None,
    device: str = "CPU",
    properties: dict[str, Any] | None = None,
    cache_dir: str | None = "default",
    columns: dict[str, str | None] | None = None,
    fetch: FetchOptions = FetchOptions(),
    retry_errors: bool = False,
    progress: bool = True,
) -> BatchSummary:
    """Caption every row of `input_path` into `output` (.jsonl or .parquet), skipping rows already there.

    `model` is an export directory or a `PipelineSpec` (loaded in-process, or
    once per worker when `workers` > 1), or a loaded `Pipeline` (in-process
    only).  `properties` are OpenVINO properties for the Pipeline (e.g. f32).
    `columns` maps "image"/"prompt"/"id" to table column names.  Ctrl-C stops
    the job with `summary.interrupted` set; everything written so far is kept.
    """
    from .generate import GenerationConfig

    config = config or GenerationConfig()
    config.validate()
    if workers < 1:
        raise LlavaOvError("--workers must be >= 1")
    cols = columns or {}
    rows = read_rows(input_path, prompt, cols.get("image"), cols.get("prompt"), cols.get("id"))
    spec = _as_spec(model, device, properties, cache_dir)
    if spec is None and workers > 1:
        raise LlavaOvError("workers > 1 need a model directory, not a loaded Pipeline")
    sink = open_sink(Path(output).expanduser())
    results = functools.partial(_results, model, spec, config, fetch, workers, threads)
    return _run(rows, sink, results, retry_errors, progress)


def _as_spec(model: Any, device: str, properties: dict | None, cache_dir: str | None) -> PipelineSpec | None:
    """The spec to load `model` from; None for an already loaded Pipeline."""
    if isinstance(model, PipelineSpec):
        return model
    if hasattr(model, "generate") and hasattr(model, "reset"):
        return None
    return PipelineSpec(str(model), device, dict(properties or {}), cache_dir)


def _results(model, spec, config, fetch, workers, threads, todo: list[Row]) -> Iterator[dict[str, Any]]:
    """The result records of `todo`: in this process, or from a pool of workers."""
    if workers == 1:
        pipe = model if spec is None else _load_with_warnings(spec.with_threads(threads))
        return (caption_row(pipe, row, config, fetch) for row in todo)
    threads = threads or max(1, cpu_count() // workers)
    return pool_results(spec.with_threads(threads), todo, config, fetch, workers)


def _load_with_warnings(spec: PipelineSpec):
    pipe = spec.load()
    for warning in pipe.warnings():
        print(f"warning: {warning}", file=sys.stderr)
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


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="row", desc="batch", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- worker processes


def pool_results(spec: PipelineSpec, rows: list[Row], config, fetch: FetchOptions, workers: int) -> Iterator[dict]:
    """Results of `rows` from `workers` spawned processes, each loading the model once (unordered)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker_main, args=(spec, config, fetch, tasks, results), daemon=True)
        for _ in range(min(workers, len(rows)))
    ]
    for p in procs:
        p.start()
    for row in rows:
        tasks.put(row)
    for _ in procs:
        tasks.put(None)
    try:
        yield from _collect(results, procs, len(rows))
    finally:
        _stop(procs, tasks)


def _collect(results, procs, pending: int) -> Iterator[dict]:
    warned = False
    while pending:
        try:
            kind, payload = results.get(timeout=1.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                raise LlavaOvError(f"the worker processes exited with {pending} rows left; rerun to resume") from None
            continue
        if kind == "failed":
            raise LlavaOvError(f"a worker could not load the model: {payload}")
        if kind == "ready":
            for warning in payload if not warned else ():
                print(f"warning: {warning}", file=sys.stderr)
            warned = True
            continue
        pending -= 1
        yield payload


def _stop(procs, tasks) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=10)
    tasks.cancel_join_thread()


def _worker_main(spec: PipelineSpec, config, fetch: FetchOptions, tasks, results) -> None:
    """A worker process: load once, answer rows until the None sentinel; the parent writes."""
    import multiprocessing as mp

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent = mp.parent_process()
    threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()  # die with the parent
    try:
        pipe = spec.load()
    except Exception as e:
        results.put(("failed", f"{type(e).__name__}: {e}"))
        return
    results.put(("ready", pipe.warnings()))
    for row in iter(tasks.get, None):
        results.put(("row", caption_row(pipe, row, config, fetch)))


# ----------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    """Add `llava-ov batch`."""
    from .cli import add_generation_args, add_model_args

    p = subparsers.add_parser(
        "batch", help="caption a folder or table of images into JSONL/Parquet (resumable; --workers, --ray)"
    )
    add_model_args(p)
    p.add_argument("input", help="folder of images (recursive), or a .csv/.jsonl/.parquet table of image paths/URLs")
    p.add_argument("-o", "--output", required=True, help="results: .jsonl or .parquet (with --ray: a directory)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for rows without their own (default: %(default)r)")
    p.add_argument("--image-column", default=None, help="table column with the image path or URL (default: image)")
    p.add_argument("--prompt-column", default=None, help="table column with a per-row prompt (default: prompt, if any)")
    p.add_argument("--id-column", default=None, help="table column with a unique row id (default: id, else row index)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (with --ray: actors), each loads the model")
    p.add_argument("--threads", type=int, default=None, help="OpenVINO threads per worker (default: cores // workers)")
    p.add_argument("--retry-errors", action="store_true", help="run again the rows recorded with an error")
    p.add_argument("--allow-private-urls", action="store_true", help="let image URLs reach private/loopback hosts")
    p.add_argument("--url-timeout", type=float, default=20.0, help="seconds allowed to fetch one image URL")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ray", action="store_true", help="run on Ray Data (a local instance unless --ray-address)")
    p.add_argument("--ray-address", default=None, help="address of an existing Ray cluster (implies --ray)")
    add_generation_args(p)
    p.set_defaults(func=cmd_batch)


def pipeline_spec(args: argparse.Namespace) -> PipelineSpec:
    """What `cli.load_pipeline(args)` would load, as a spec other processes can load."""
    from .cli import pipeline_options

    return PipelineSpec(**pipeline_options(args))


def cmd_batch(args: argparse.Namespace) -> int:
    """Exit status: 0 every row answered, 1 some rows have errors, 130 interrupted (see BatchSummary.exit_code)."""
    from .cli import generation_config

    spec = pipeline_spec(args)
    common = dict(
        prompt=args.prompt, config=generation_config(args), workers=args.workers, threads=args.threads,
        columns={"image": args.image_column, "prompt": args.prompt_column, "id": args.id_column},
        fetch=FetchOptions(fetch_timeout_s=args.url_timeout, allow_private_urls=args.allow_private_urls),
        retry_errors=args.retry_errors,
    )  # fmt: skip
    if args.ray or args.ray_address:
        from .ray_batch import run_ray_batch

        summary = run_ray_batch(spec, args.input, args.output, address=args.ray_address, **common)
    else:
        summary = run_batch(spec, args.input, args.output, progress=not args.no_progress, **common)
    print(summary.line(), file=sys.stderr)
    return summary.exit_code
