"""Batch captioning (llava_ov.frontends.batch.local): inputs, outputs, errors, resume after kill/Ctrl-C, workers.

Every answered row must equal `Pipeline.generate` on the same image and prompt
(tiny random-weight llava-next export, greedy, f32).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llava_ov.frontends.batch.local import FetchOptions, run_batch
from llava_ov.frontends.batch.files import JsonlSink, read_rows
from llava_ov.errors import InvalidImageError, LlavaOvError
from llava_ov.runtime.fetch import fetch_url
from llava_ov.runtime.generate import GenerationConfig

MAX_NEW = 12
CONFIG = GenerationConfig(max_new_tokens=MAX_NEW)
PHOTOS = ("chelsea", "coffee", "rocket")
DEFAULT = "Describe this image."


@pytest.fixture(scope="module")
def model(exports) -> Path:
    return exports["llava-next"]


@pytest.fixture(scope="module")
def pipe(model):
    from conftest import F32
    from llava_ov.runtime.pipeline import Pipeline

    return Pipeline(model, properties=F32, cache_dir=None)


@pytest.fixture(scope="module")
def reference(pipe, photos):
    """(photo name, prompt) -> Pipeline.generate result, computed once, each from an empty KV cache."""

    @functools.lru_cache(maxsize=None)
    def ref(name: str, prompt: str = DEFAULT):
        pipe.reset()
        return pipe.generate(prompt, [str(photos[name])], CONFIG)

    return ref


@pytest.fixture
def folder(tmp_path, photos) -> Path:
    """Three real photos (one in a sub-folder) plus a corrupt and an empty image file."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    shutil.copy(photos["chelsea"], root / "chelsea.png")
    shutil.copy(photos["coffee"], root / "sub" / "coffee.png")
    shutil.copy(photos["rocket"], root / "rocket.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image: ignored")
    return root


FOLDER_IDS = {"broken.png": None, "chelsea.png": "chelsea", "empty.jpg": None, "rocket.jpg": "rocket",
              "sub/coffee.png": "coffee"}  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_output(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_jsonl(path)


def assert_matches(record: dict, ref) -> None:
    """One answered row equals Pipeline.generate."""
    assert record["error"] is None, record["error"]
    assert record["answer"] == ref.text
    assert record["finish_reason"] == ref.finish_reason
    assert record["prompt_tokens"] == ref.prompt_tokens
    assert record["completion_tokens"] == len(ref.token_ids)
    t = record["timings"]
    assert t["ttft_s"] > 0 and t["total_s"] >= t["ttft_s"] and t["tpot_s"] >= 0


def assert_folder_output(records: list[dict], reference) -> None:
    """Exactly one record per folder row; photos answered as generate, broken files recorded as errors."""
    assert sorted(r["id"] for r in records) == sorted(FOLDER_IDS)
    for r in records:
        photo = FOLDER_IDS[r["id"]]
        if photo is None:
            assert r["answer"] is None and r["finish_reason"] == "error" and r["error"]
        else:
            assert_matches(r, reference(photo))


# ----------------------------------------------------------------------------- folder input, JSONL out


def test_folder_to_jsonl_matches_generate_and_records_errors(pipe, reference, folder, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_batch(pipe, folder, out, config=CONFIG, progress=False)
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == sorted(FOLDER_IDS)  # rows in flight finish in any order
    assert_folder_output(records, reference)
    errors = {r["id"]: r["error"] for r in records if r["error"]}
    assert "corrupt" in errors["broken.png"] and "empty" in errors["empty.jpg"]
    assert all(r["prompt"] == DEFAULT and r["image"] == r["id"] for r in records)
    assert (summary.total, summary.succeeded, summary.failed, summary.skipped) == (5, 3, 2, 0)
    assert not summary.interrupted and "3 ok, 2 failed, 0 skipped" in summary.line()

    before = out.read_bytes()
    again = run_batch(pipe, folder, out, config=CONFIG, progress=False)
    assert (again.succeeded, again.failed, again.skipped, again.skipped_errors) == (0, 0, 5, 2)
    assert again.exit_code == 1  # the output still holds rows with errors
    assert out.read_bytes() == before


# ----------------------------------------------------------------------------- table inputs


def write_table(path: Path, records: list[dict]) -> None:
    if path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)


@pytest.mark.parametrize("fmt,out_name", [("csv", "out.jsonl"), ("jsonl", "out.parquet"), ("parquet", "out.parquet")])
def test_table_input_with_per_row_prompts(pipe, reference, photos, tmp_path, fmt, out_name):
    shutil.copy(photos["chelsea"], tmp_path / "cat.png")  # relative to the table's folder
    rows = [
        {"key": "r1", "file": "cat.png", "question": "What animal is this?"},
        {"key": "r2", "file": str(photos["coffee"]), "question": ""},  # absolute path, default prompt
        {"key": "r3", "file": "missing.png", "question": "Anything?"},
    ]
    table = tmp_path / f"rows.{fmt}"
    write_table(table, rows)
    out = tmp_path / out_name
    cols = {"image": "file", "prompt": "question", "id": "key"}
    summary = run_batch(pipe, table, out, prompt=DEFAULT, config=CONFIG, columns=cols, progress=False)
    by_id = {r["id"]: r for r in read_output(out)}
    assert sorted(by_id) == ["r1", "r2", "r3"]
    assert_matches(by_id["r1"], reference("chelsea", "What animal is this?"))
    assert_matches(by_id["r2"], reference("coffee", DEFAULT))
    assert by_id["r1"]["prompt"] == "What animal is this?" and by_id["r1"]["image"] == "cat.png"
    assert "not found" in by_id["r3"]["error"] and by_id["r3"]["prompt"] == "Anything?"
    assert (summary.succeeded, summary.failed, summary.skipped) == (2, 1, 0)
    assert not (tmp_path / (out_name + ".journal.jsonl")).exists()

    # a new row in the input: only it runs; the output keeps the earlier rows once each
    write_table(table, rows + [{"key": "r4", "file": "gone.jpg", "question": ""}])
    summary = run_batch(pipe, table, out, config=CONFIG, columns=cols, progress=False)
    assert (summary.succeeded, summary.failed, summary.skipped) == (0, 1, 3)
    again = read_output(out)
    assert sorted(r["id"] for r in again) == ["r1", "r2", "r3", "r4"]
    assert {r["id"]: r for r in again}["r1"]["answer"] == by_id["r1"]["answer"]


def test_default_columns_and_row_index_ids(tmp_path, photos):
    table = tmp_path / "t.csv"
    write_table(table, [{"image": str(photos["chelsea"])}, {"image": "https://example.com/x.png"}])
    rows = read_rows(table, prompt="Hi")
    assert [(r.id, r.prompt) for r in rows] == [("0", "Hi"), ("1", "Hi")]
    assert rows[1].source == "https://example.com/x.png"


@pytest.mark.parametrize(
    "records,cols,message",
    [
        ([{"path": "a.png"}], {}, "no 'image' column"),
        ([{"image": "a.png"}], {"prompt": "q"}, "no column 'q'"),
        ([{"image": "a.png", "id": "x"}, {"image": "b.png", "id": "x"}], {}, "duplicate row id 'x'"),
    ],
)
def test_bad_tables_are_refused_clearly(tmp_path, pipe, records, cols, message):
    table = tmp_path / "t.jsonl"
    write_table(table, records)
    with pytest.raises(LlavaOvError, match=message):
        run_batch(pipe, table, tmp_path / "o.jsonl", columns=cols, progress=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_paths_are_refused_clearly(tmp_path, pipe, folder):
    with pytest.raises(LlavaOvError, match="not found"):
        run_batch(pipe, tmp_path / "nope", tmp_path / "o.jsonl", progress=False)
    with pytest.raises(LlavaOvError, match=r"\.jsonl or \.parquet"):
        run_batch(pipe, folder, tmp_path / "o.csv", progress=False)
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(LlavaOvError, match="unsupported batch input"):
        run_batch(pipe, tmp_path / "t.txt", tmp_path / "o.jsonl", progress=False)


# ----------------------------------------------------------------------------- resume mechanics


def test_jsonl_sink_drops_a_cut_line_and_refuses_a_corrupt_one(tmp_path):
    out = tmp_path / "o.jsonl"
    good = [json.dumps({"id": str(i), "error": None}) + "\n" for i in range(2)]
    out.write_text("".join(good) + '{"id": "2", "ans')  # a crash cut the third line
    sink = JsonlSink(out)
    assert sorted(sink.open()) == ["0", "1"]
    assert out.read_text() == "".join(good)
    with pytest.raises(LlavaOvError, match="another batch job"):
        JsonlSink(out).open()  # the first sink still holds the lock
    sink.close()

    out.write_text(good[0] + "garbage\n" + good[1])
    with pytest.raises(LlavaOvError, match="line 2 is corrupt"):
        JsonlSink(out).open()


def test_parquet_resumes_from_the_journal_a_crash_left(pipe, reference, folder, tmp_path):
    # The state a crash leaves: a journal with two finished rows and a cut third line, no parquet yet.
    done = tmp_path / "first.jsonl"
    run_batch(pipe, folder / "sub", done, config=CONFIG, progress=False)  # sub/coffee.png only
    (record,) = read_jsonl(done)
    record["id"] = "sub/coffee.png"
    broken = {"id": "broken.png", "image": "broken.png", "error": "earlier error", "finish_reason": "error"}
    out = tmp_path / "out.parquet"
    journal = tmp_path / "out.parquet.journal.jsonl"
    journal.write_text(json.dumps(record) + "\n" + json.dumps(broken) + "\n" + '{"id": "rock')

    summary = run_batch(pipe, folder, out, config=CONFIG, progress=False)
    assert (summary.succeeded, summary.failed, summary.skipped) == (2, 1, 2)
    records = read_output(out)
    assert [r["id"] for r in records] == sorted(FOLDER_IDS)  # parquet rows in input order
    assert_folder_output(records, reference)
    assert not journal.exists()


def test_retry_errors_reruns_failed_rows_once(pipe, reference, photos, tmp_path):
    table = tmp_path / "t.jsonl"
    write_table(table, [{"id": "late", "image": "late.png"}])
    out = tmp_path / "o.jsonl"
    assert run_batch(pipe, table, out, config=CONFIG, progress=False).failed == 1
    shutil.copy(photos["chelsea"], tmp_path / "late.png")
    assert run_batch(pipe, table, out, config=CONFIG, progress=False).skipped == 1  # errors count as done
    summary = run_batch(pipe, table, out, config=CONFIG, retry_errors=True, progress=False)
    assert (summary.succeeded, summary.failed, summary.skipped) == (1, 0, 0) and summary.exit_code == 0
    (record,) = read_jsonl(out)
    assert_matches(record, reference("chelsea"))


# ----------------------------------------------------------------------------- URLs


@pytest.fixture(scope="module")
def http_root(photos):
    """A local HTTP server serving the photos folder."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(photos["chelsea"].parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_rows_are_fetched_within_limits(pipe, reference, photos, http_root, tmp_path):
    table = tmp_path / "t.csv"
    write_table(table, [
        {"id": "cat", "image": f"{http_root}/{photos['chelsea'].name}"},
        {"id": "404", "image": f"{http_root}/no-such.png"},
        {"id": "ftp", "image": "ftp://example.com/a.png"},
    ])  # fmt: skip
    out = tmp_path / "o.jsonl"
    run_batch(pipe, table, out, config=CONFIG, fetch=FetchOptions(allow_private_urls=True), progress=False)
    by_id = {r["id"]: r for r in read_jsonl(out)}
    assert_matches(by_id["cat"], reference("chelsea"))
    assert "HTTP status 404" in by_id["404"]["error"]
    assert "only http:// and https://" in by_id["ftp"]["error"]

    # by default a URL may not reach loopback/private hosts
    out2 = tmp_path / "o2.jsonl"
    run_batch(pipe, table, out2, config=CONFIG, progress=False)
    assert "loopback, private" in {r["id"]: r for r in read_jsonl(out2)}["cat"]["error"]


def test_fetch_url_limits(http_root, photos):
    """The batch limits (shared fetcher, batch defaults): bytes, private hosts, total time."""
    defaults = FetchOptions()
    assert (defaults.max_bytes, defaults.fetch_timeout_s, defaults.max_redirects) == (20_000_000, 20, 5)
    url = f"{http_root}/{photos['chelsea'].name}"
    assert fetch_url(url, FetchOptions(allow_private_urls=True)) == photos["chelsea"].read_bytes()
    with pytest.raises(InvalidImageError, match="over the limit of 1,000 bytes"):
        fetch_url(url, FetchOptions(allow_private_urls=True, max_bytes=1000))
    with pytest.raises(InvalidImageError, match="loopback, private"):
        fetch_url(url.replace("127.0.0.1", "localhost"), FetchOptions())
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        quick = FetchOptions(allow_private_urls=True, fetch_timeout_s=0.3)
        with pytest.raises(InvalidImageError, match="longer than 0.3 s"):
            fetch_url(f"http://127.0.0.1:{silent.getsockname()[1]}/x.png", quick)


# ----------------------------------------------------------------------------- the CLI job killed and resumed


def cli_command(model: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llava_ov.cli", "batch", str(model), str(folder), "-o", str(out), "--f32",
            "--max-new-tokens", str(MAX_NEW), "--no-progress", *extra]  # fmt: skip


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def interrupt_after(cmd: list[str], watch: Path, rows: int, sig: int, env: dict, log: Path) -> int:
    """Start the job, send `sig` once `rows` results are on disk; returns the exit status."""
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while complete_lines(watch) < rows and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the job ended before it was interrupted:\n{log.read_text()}"
        assert complete_lines(watch) >= rows, f"no results after 300 s:\n{log.read_text()}"
        proc.send_signal(sig)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # a failed check: do not leave the job running
            proc.kill()
            proc.wait()


@pytest.fixture
def big_folder(folder, photos) -> Path:
    """The folder plus two more photos: 7 rows, enough that a job is caught mid-way."""
    shutil.copy(photos["chelsea"], folder / "chelsea-copy.png")
    shutil.copy(photos["coffee"], folder / "sub" / "coffee-copy.png")
    return folder


BIG_IDS = {**FOLDER_IDS, "chelsea-copy.png": "chelsea", "sub/coffee-copy.png": "coffee"}


def check_resumed(records: list[dict], before: int, stderr: str, reference) -> None:
    assert sorted(r["id"] for r in records) == sorted(BIG_IDS)  # nothing lost, nothing twice
    for r in records:
        if BIG_IDS[r["id"]]:
            assert_matches(r, reference(BIG_IDS[r["id"]]))
        else:
            assert r["error"]
    assert f"{before} skipped (already done" in stderr


def test_cli_job_killed_then_resumed(model, big_folder, tmp_path, reference):
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cmd = cli_command(model, big_folder, out)
    assert interrupt_after(cmd, out, 2, signal.SIGKILL, env, tmp_path / "err1") == -signal.SIGKILL
    data = out.read_bytes()
    lines = data.split(b"\n")
    assert 2 <= len(lines) - 1 < len(BIG_IDS)  # killed mid-way
    assert all(json.loads(line)["id"] in BIG_IDS for line in lines[:-1])  # every complete line is whole

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr  # 1: some rows (the broken files) failed
    check_resumed(read_jsonl(out), len(lines) - 1, rerun.stderr, reference)


def test_cli_ctrl_c_with_two_in_flight_then_resumed(model, big_folder, tmp_path, reference):
    """Ctrl-C stops a job with 2 rows in flight cleanly; the rerun completes it with the same answers."""
    out = tmp_path / "out.parquet"
    journal = tmp_path / "out.parquet.journal.jsonl"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cmd = cli_command(model, big_folder, out, "--in-flight", "2")
    log = tmp_path / "err1"
    assert interrupt_after(cmd, journal, 2, signal.SIGINT, env, log) == 130
    assert "batch interrupted" in log.read_text()
    assert not out.exists()  # the parquet is written at the end only
    before = len(read_jsonl(journal))
    assert 2 <= before < len(BIG_IDS)

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr
    check_resumed(read_output(out), before, rerun.stderr, reference)
    assert not journal.exists()


def test_a_failed_write_leaves_no_partial_line(tmp_path, monkeypatch):
    """A short write (full disk) is undone and reported; the file holds only whole lines."""
    from llava_ov.frontends.batch.files import JsonlSink

    sink = JsonlSink(tmp_path / "out.jsonl")
    sink.open()
    sink.write({"id": "a", "answer": "ok"})
    real_write = os.write
    calls = []

    def short_write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:5]))  # the disk takes 5 bytes ...
        raise OSError(28, "No space left on device")  # ... then is full

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(LlavaOvError, match="No space left"):
        sink.write({"id": "b", "answer": "x" * 100})
    monkeypatch.setattr(os, "write", real_write)
    sink.close()
    assert (tmp_path / "out.jsonl").read_bytes().count(b"\n") == 1
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["a"]


CATALOGUE = {
    "type": "object",
    "properties": {"caption": {"type": "string", "maxLength": 30}, "has_text": {"type": "boolean"},
                   "objects": {"type": "array", "items": {"enum": ["cat", "cup", "rocket", "sky"]}, "maxItems": 3}},
    "required": ["caption", "has_text", "objects"], "additionalProperties": False,
}  # fmt: skip


@pytest.mark.parametrize("out_name", ["out.jsonl", "out.parquet"])
def test_json_schema_rows_store_the_parsed_object_and_mark_cut_ones(pipe, photos, tmp_path, out_name):
    import jsonschema

    table = tmp_path / "rows.jsonl"
    write_table(table, [{"id": n, "image": str(photos[n])} for n in PHOTOS])
    out = tmp_path / out_name
    config = GenerationConfig(max_new_tokens=120, json_schema=CATALOGUE)
    summary = run_batch(pipe, table, out, config=config, progress=False)
    assert (summary.succeeded, summary.failed) == (3, 0)
    for record in read_output(out):
        obj = json.loads(record["json"]) if out.suffix == ".parquet" else record["json"]  # Parquet: JSON text
        jsonschema.validate(obj, CATALOGUE)
        assert obj == json.loads(record["answer"]) and record["finish_reason"] == "eos" and record["error"] is None

    cut = tmp_path / ("cut" + out.suffix)
    short = GenerationConfig(max_new_tokens=5, json_schema=CATALOGUE)
    summary = run_batch(pipe, table, cut, config=short, progress=False)
    assert (summary.succeeded, summary.failed, summary.exit_code) == (0, 3, 1)
    for record in read_output(cut):  # marked: an error naming the fix, the partial text kept
        assert record["finish_reason"] == "length" and record["json"] is None and record["answer"]
        assert "raise --max-new-tokens" in record["error"] and "--retry-errors" in record["error"]
    summary = run_batch(pipe, table, cut, config=config, progress=False, retry_errors=True)  # only those rerun
    assert (summary.succeeded, summary.failed) == (3, 0)
    assert all(r["error"] is None for r in read_output(cut))


def test_unusable_schema_stops_the_batch_before_any_row(pipe, photos, tmp_path):
    table = tmp_path / "rows.jsonl"
    write_table(table, [{"id": "a", "image": str(photos["chelsea"])}])
    config = GenerationConfig(json_schema={"type": "string", "format": "no-such-format"})
    with pytest.raises(LlavaOvError, match="Unknown format"):
        run_batch(pipe, table, tmp_path / "out.jsonl", config=config, progress=False)
    assert not (tmp_path / "out.jsonl").exists() or read_output(tmp_path / "out.jsonl") == []


def test_load_warnings_and_logs_print_above_the_progress_bar(model, folder, tmp_path, capsys, monkeypatch):
    """The model's warnings (random weights here) and log records print on lines of their own, not inside the
    progress bar's line (they used to land after its `0%|...|` text)."""
    import logging

    from llava_ov.cli import main
    from llava_ov.frontends.batch import local

    load = local._load_with_warnings

    def load_and_log(spec):
        pipe = load(spec)
        logging.getLogger("llava_ov.test").warning("a log record during the job")
        return pipe

    monkeypatch.setattr(local, "_load_with_warnings", load_and_log)
    main(["batch", str(model), str(folder), "-o", str(tmp_path / "out.jsonl"), "--max-new-tokens", "2", "--f32"])
    err = capsys.readouterr().err
    assert "batch:" in err and "%|" in err  # the bar was drawn
    for text in ("warning: This checkpoint has random weights", "a log record during the job"):
        line = next(line for line in err.split("\n") if text in line)
        assert text in line.split("\r")[-1].strip()[: len(text) + 12], repr(line)  # starts its own line
        assert "%|" not in line.split("\r")[-1], repr(line)
