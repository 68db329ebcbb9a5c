"""Batch captioning on Ray Data: the rows of `llava_ov.frontends.batch.local`, answered by a pool of actors.

The driver reads the input into rows (same ids, prompts and path resolution as
the single-machine job), drops the ids already present in the output
directory's Parquet shards (resume), and hands the rest to
`ray.data.from_items(...).map_batches(Captioner, compute=ActorPoolStrategy(size=N))`: each actor
loads the Pipeline once and answers its batches with `batch.caption_row`.
Results stream into `write_parquet(OUTPUT)` as shards, so a crash loses at most
the batches in flight.  Works on a local Ray instance (started here, small and
offline) or an existing cluster (`address=`).  See docs/batch.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_ov.frontends.batch.local import BatchSummary, FetchOptions, PipelineSpec, caption_row, cpu_count, error_record
from llava_ov.frontends.batch.files import DEFAULT_PROMPT, Row, arrow_records, arrow_schema, read_rows
from llava_ov.errors import LlavaOvError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
LOCAL_OBJECT_STORE_BYTES = 200 * 1024 * 1024  # rows are small; the default (30% of RAM) is far too much here
CORRUPT_SUFFIX = ".corrupt"
SHARD_PREFIX = "captions-"  # the shards this module writes; no other file in the folder is ever renamed
ATTEMPTS = ".attempts"  # in the output folder while a run goes: a marker per row being answered
WORKER_DIED = ("the worker answering this row died (its process crashed, e.g. out of memory or in the plugin); "
               "the row is not tried again in this run")  # fmt: skip


class Captioner:
    """A Ray Data actor: loads the Pipeline once, then answers batches of rows (pyarrow in and out)."""

    def __init__(self, spec: PipelineSpec, config, fetch: FetchOptions, attempts: str):
        self.attempts = Attempts(Path(attempts))
        self.pipe = self.attempts.load(spec)
        self.config, self.fetch = config, fetch

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        rows = [Row(**r) for r in batch.to_pylist()]
        records = [self.attempts.answer(row, self._caption) for row in rows]
        return pa.Table.from_pylist(arrow_records(records), schema=arrow_schema())

    def _caption(self, row: Row) -> dict[str, Any]:
        return caption_row(self.pipe, row, self.config, self.fetch)


class Attempts:
    """What killed a worker. Ray restarts a dead actor (and runs its batch again) without end; Ray's own knob
    for that, `max_restarts`, has no place in its API after the `ray_remote_args` deprecation. So a marker
    file stands for each model load and each row while it runs: a restarted actor that finds its own load's
    marker refuses to load again (the run ends with that error), and a row found marked becomes an error record
    instead of crashing worker after worker."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self, spec: PipelineSpec) -> Any:
        """`spec.load()`, unless this actor's process already died doing it (LlavaOvError)."""
        import ray

        marker = self.folder / f"load-{ray.get_runtime_context().get_actor_id()}"
        if marker.exists():
            raise LlavaOvError("the worker's process died while it loaded the model (a crash in the plugin, or "
                               "out of memory); it is not loaded again")  # fmt: skip
        marker.touch()
        pipe = spec.load()
        marker.unlink(missing_ok=True)
        return pipe

    def answer(self, row: Row, caption: Any) -> dict[str, Any]:
        marker = self.folder / hashlib.sha256(row.id.encode()).hexdigest()[:32]
        if marker.exists():
            return error_record(row, WORKER_DIED, 0.0)
        marker.touch()
        record = caption(row)
        marker.unlink(missing_ok=True)
        return record


def existing_results(out: Path) -> dict[str, str | None]:
    """id -> error (None when answered) of every shard in `out`.

    An unreadable shard of ours (cut by a crash) is set aside as .corrupt and its rows run again; an
    unreadable Parquet file we did not write is left as it is, with a warning."""
    import pyarrow.parquet as pq

    found: dict[str, str | None] = {}
    for shard in sorted(out.glob("*.parquet")):
        try:
            table = pq.read_table(shard, columns=["id", "error"])
        except Exception:
            if shard.name.startswith(SHARD_PREFIX):
                shard.rename(shard.with_name(shard.name + CORRUPT_SUFFIX))
            else:
                log.warning("%s is not a readable results shard; left as it is and not counted", shard.name)
            continue
        found.update(zip(table.column("id").to_pylist(), table.column("error").to_pylist()))
    return found


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to `address`, reuse a running instance, or start a small offline local one.

    Returns True when this call started Ray (the caller then shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
        return True
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a local instance
    ray.init(
        num_cpus=num_cpus or cpu_count(), include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES, configure_logging=False,
    )  # fmt: skip
    return True


def run_ray_batch(
    spec: PipelineSpec,
    input_path: str | Path,
    output_dir: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    config=None,
    workers: int = 1,
    threads: int | None = None,
    columns: dict[str, str | None] | None = None,
    fetch: FetchOptions = FetchOptions(),
    retry_errors: bool = False,
    address: str | None = None,
    batch_size: int = 4,
) -> BatchSummary:
    """Caption the rows not yet in `output_dir` with `workers` actors of `threads` CPUs each.

    Results are written as Parquet shards into `output_dir`.  Uses a running Ray
    instance if there is one, else `address`, else starts a local one.
    """
    from llava_ov.runtime.generate import GenerationConfig

    config = config or GenerationConfig()
    config.validate()
    if retry_errors:
        raise LlavaOvError("--retry-errors is not supported with --ray; delete the shards with errors instead")
    if workers < 1:
        raise LlavaOvError("--workers must be >= 1")
    started = time.perf_counter()
    cols = columns or {}
    rows = read_rows(input_path, prompt, cols.get("image"), cols.get("prompt"), cols.get("id"), cols.get("video"))
    out = _output_dir(output_dir)
    done = existing_results(out)
    todo = [row for row in rows if row.id not in done]
    summary = BatchSummary(total=len(rows), skipped=len(rows) - len(todo), output=str(out))
    summary.skipped_errors = sum(1 for row in rows if done.get(row.id))
    if todo:
        threads = threads or max(1, cpu_count() // workers)
        summary.interrupted = _run_on_ray(spec.with_threads(threads), todo, out, config, fetch, workers, threads,
                                          address, batch_size)  # fmt: skip
        _count(summary, existing_results(out), todo)
    summary.elapsed_s = time.perf_counter() - started
    return summary


def _output_dir(output_dir: str | Path) -> Path:
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise LlavaOvError(f"with --ray the output is a directory of Parquet shards; {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run_on_ray(spec, todo: list[Row], out: Path, config, fetch, workers, threads, address, batch_size) -> bool:
    """Run the dataset to its shards; returns True if interrupted (Ctrl-C)."""
    import ray

    own = start_ray(address)
    attempts = out / ATTEMPTS
    shutil.rmtree(attempts, ignore_errors=True)  # rows in flight when an earlier run stopped did not crash anything
    attempts.mkdir()
    try:
        # a worker that dies while it loads the model (e.g. the plugin crashing as it compiles) ends the run
        ray.data.DataContext.get_current().max_consecutive_actor_init_deaths = 0
        items: list[dict[str, Any]] = [asdict(row) for row in todo]
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch_size)))
        ds = ds.map_batches(
            Captioner, fn_constructor_kwargs={"spec": spec, "config": config, "fetch": fetch, "attempts": str(attempts)},
            batch_size=batch_size, batch_format="pyarrow", num_cpus=threads,
            compute=ray.data.ActorPoolStrategy(size=workers),  # the `concurrency=N` of older Ray releases
        )  # fmt: skip
        ds.write_parquet(str(out), filename_provider=_shard_names(),
                         ray_remote_args={"num_cpus": 0})  # writing is light; actors hold the CPUs
        return False
    except KeyboardInterrupt:
        return True
    except ray.exceptions.RayError as exc:
        raise LlavaOvError(f"a Ray worker failed: {_ray_reason(exc)}; the rows already written are kept "
                           "(run again to resume)") from None
    finally:
        shutil.rmtree(attempts, ignore_errors=True)
        if own:
            ray.shutdown()


def _ray_reason(exc: BaseException) -> str:
    """The line of a Ray error that says why (the worker's exit detail when it died)."""
    text = str(exc)
    for marker in ("Worker exit detail:", "The actor died", "Error"):
        at = text.find(marker)
        if at >= 0:
            return text[at:].split(". Some common causes")[0].splitlines()[0].strip()
    return type(exc).__name__


def _shard_names():
    """Ray's filename provider naming our shards captions-<write>_<task>.parquet."""
    from ray.data.datasource import FilenameProvider

    class ShardNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{SHARD_PREFIX}{write_uuid}_{task_index:06}.parquet"

    return ShardNames(file_format="parquet")


def _count(summary: BatchSummary, results: dict[str, str | None], todo: list[Row]) -> None:
    for row in todo:
        if row.id in results:
            summary.succeeded += results[row.id] is None
            summary.failed += results[row.id] is not None
