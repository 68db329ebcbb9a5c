"""Batch job input and output: rows from a folder or a table, and crash-safe result sinks.

Inputs: a folder of images and videos (recursive, sorted; the relative path is the row id)
or a CSV/JSONL/Parquet table with an image and/or a video path/URL column and optional
prompt and id columns.  Outputs: JSONL (one fsynced append per finished row; a cut last
line is truncated on restart) or Parquet (rows journalled to OUTPUT.journal.jsonl
during the run, then written atomically with os.replace).  A rerun reads what is
there and skips the ids already done.
"""

from __future__ import annotations

import csv
import errno
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_ov.errors import LlavaOvError
from llava_ov.runtime.video import VIDEO_EXTENSIONS

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

TABLE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
DEFAULT_PROMPT = "Describe this image."
DEFAULT_VIDEO_PROMPT = "Describe this video."  # rows with a video and no image, when --prompt is left as it is
JOURNAL_SUFFIX = ".journal.jsonl"
FIELDS = (
    "id", "image", "video", "prompt", "answer", "finish_reason", "prompt_tokens", "completion_tokens", "timings",
    "json",  # with a JSON schema: the parsed answer (JSONL: the object; Parquet: its JSON text)
    "error",
)  # fmt: skip


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One unit of work: a stable id, the image and/or video as given, where to load them from, and the prompt."""

    id: str
    image: str  # as written in the input (relative path, URL) -- echoed in the output
    source: str  # absolute path or URL to load ("" : no image)
    prompt: str
    video: str = ""  # as written in the input
    video_source: str = ""  # absolute path or URL to load ("" : no video)


def read_rows(
    input_path: str | Path,
    prompt: str = DEFAULT_PROMPT,
    image_column: str | None = None,
    prompt_column: str | None = None,
    id_column: str | None = None,
    video_column: str | None = None,
) -> list[Row]:
    """The rows of a folder of images and videos or a CSV/JSONL/Parquet table, in a deterministic order."""
    path = Path(input_path).expanduser()
    if path.is_dir():
        rows = folder_rows(path, prompt)
    elif path.is_file():
        rows = table_rows(path, read_table(path), prompt, image_column, prompt_column, id_column, video_column)
    else:
        raise LlavaOvError(f"batch input not found: {path}")
    check_unique_ids(rows)
    return rows


def folder_rows(folder: Path, prompt: str) -> list[Row]:
    """Every image and video file under `folder` (recursive), sorted by relative path; the id is that path."""
    files = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    rows = []
    for p in files:
        rel, full = p.relative_to(folder).as_posix(), str(p.resolve())
        if p.suffix.lower() in VIDEO_EXTENSIONS:
            rows.append(Row(rel, "", "", video_prompt(prompt), rel, full))
        else:
            rows.append(Row(rel, rel, full, prompt))
    return rows


def video_prompt(prompt: str) -> str:
    """The prompt of a row with only a video: the video default where the image default was left."""
    return DEFAULT_VIDEO_PROMPT if prompt == DEFAULT_PROMPT else prompt


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
    video_column: str | None = None,
) -> list[Row]:
    """Rows from table records; relative image and video paths are resolved against the table's folder."""
    columns = {k for r in records for k in r}
    video_col = _column(columns, video_column, "video", required=False, path=path)
    image_col = _column(columns, image_column, "image", required=video_col is None, path=path)
    prompt_col = _column(columns, prompt_column, "prompt", required=False, path=path)
    id_col = _column(columns, id_column, "id", required=False, path=path)
    rows = []
    for index, record in enumerate(records):
        image = _text(record.get(image_col)) if image_col else ""
        video = _text(record.get(video_col)) if video_col else ""
        row_prompt = _text(record.get(prompt_col)) if prompt_col else ""
        row_id = _text(record.get(id_col)) if id_col else str(index)
        if not row_id:
            raise LlavaOvError(f"{path.name} row {index} has an empty {id_col!r}")
        default = video_prompt(prompt) if video and not image else prompt
        rows.append(Row(row_id, image, resolve_source(image, path.parent), row_prompt or default,
                        video, resolve_source(video, path.parent)))  # fmt: skip
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
            f"{path.name} has no {default!r} column (nor a 'video' one); name the image column with --image-column "
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


# ----------------------------------------------------------------------------- output sinks


def arrow_schema():
    """The Parquet schema of result records (shared with the Ray path)."""
    import pyarrow as pa

    timings = pa.struct([("ttft_s", pa.float64()), ("tpot_s", pa.float64()), ("total_s", pa.float64())])
    types = [pa.string()] * 6 + [pa.int64(), pa.int64(), timings, pa.string(), pa.string()]
    return pa.schema(list(zip(FIELDS, types)))


def arrow_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records as Parquet stores them: the parsed JSON answer as JSON text."""
    out = []
    for record in records:
        value = record.get("json")
        if value is not None and not isinstance(value, str):
            record = {**record, "json": json.dumps(value, ensure_ascii=False)}
        out.append(record)
    return out



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
        """Append one whole line and make it durable; a failed or short write leaves no partial line."""
        start = os.lseek(self._fd, 0, os.SEEK_END)
        view = memoryview(_line(record))
        try:
            while view:
                written = os.write(self._fd, view)
                if written == 0:
                    raise OSError(errno.ENOSPC, "no space left on device")
                view = view[written:]
            os.fsync(self._fd)
        except OSError as exc:
            os.ftruncate(self._fd, start)  # never leave half a line behind
            raise LlavaOvError(f"cannot write to {self.path}: {exc.strerror or exc}; rerun to resume") from None

    def close(self, order: list[str] | None = None) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Delete the file while still holding its lock (no other job can open it in between), then close."""
        self.path.unlink(missing_ok=True)
        self.close()


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
            if self.journal.recover():
                self.journal.close()
            else:
                self.journal.remove()
            return
        records = {**self.previous, **self.journal.recover()}
        rank = {row_id: i for i, row_id in enumerate(order)}
        rows = sorted(records.values(), key=lambda r: (rank.get(r["id"], len(rank)), r["id"]))
        write_parquet_atomic(self.path, rows)
        self.journal.remove()


def write_parquet_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(arrow_records(records), schema=arrow_schema()), tmp)
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


