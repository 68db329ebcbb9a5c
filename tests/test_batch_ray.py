"""Batch captioning on Ray Data (llava_ov.frontends.batch.on_ray) on a small local Ray instance.

The Ray path must give the single-machine answers (`Pipeline.generate` per
row), write every row once as Parquet shards, and resume from the shards
already in the output directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import ray

from llava_ov.frontends.batch.local import PipelineSpec, run_batch
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.settings import LoadSettings

# our calls must not use what Ray has announced it will remove (ray_remote_args in 2.64)
pytestmark = pytest.mark.filterwarnings("error::ray.util.annotations.RayDeprecationWarning")
CONFIG = GenerationConfig(max_new_tokens=12)
DEFAULT = "Describe this image."


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A 2-CPU Ray instance for this module: no dashboard, a small object store, no usage reporting."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
        configure_logging=False, log_to_driver=False,
    )  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pipe(exports):
    from conftest import F32
    from llava_ov.runtime.pipeline import Pipeline

    return Pipeline(exports["llava-next"], properties=F32, cache_dir=None)


@pytest.fixture
def folder(tmp_path, photos) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        shutil.copy(photos[name], root / photos[name].name)
    (root / "broken.png").write_bytes(b"not an image")
    return root


def read_shards(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for shard in sorted(out.glob("captions-*.parquet")) for r in pq.read_table(shard).to_pylist()]


def test_ray_matches_single_machine_and_resumes(local_ray, exports, pipe, folder, tmp_path):
    from conftest import F32
    from llava_ov.cli import main
    from llava_ov.frontends.batch.on_ray import run_ray_batch

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    single = tmp_path / "single.parquet"
    run_batch(pipe, folder, single, config=CONFIG, progress=False)
    table = pq.read_table(single)
    expected = {r["id"]: r for r in table.to_pylist()}

    # An earlier run left one finished shard (coffee) and one cut by a crash; the user keeps an
    # unreadable Parquet file of their own there too.
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(table.filter(pc.equal(table["id"], "coffee.png")), out / "captions-earlier.parquet")
    (out / "captions-cut.parquet").write_bytes(b"PAR1 truncated")
    (out / "notes.parquet").write_bytes(b"not ours, not readable")

    spec = PipelineSpec(str(exports["llava-next"]), LoadSettings(properties=dict(F32), cache_dir=None))
    summary = run_ray_batch(spec, folder, out, config=CONFIG, workers=2, batch_size=2)
    assert (summary.total, summary.succeeded, summary.failed, summary.skipped) == (4, 2, 1, 1)
    assert (out / "captions-cut.parquet.corrupt").exists() and not (out / "captions-cut.parquet").exists()
    assert (out / "notes.parquet").read_bytes() == b"not ours, not readable"  # never renamed: we did not write it

    records = read_shards(out)
    assert sorted(r["id"] for r in records) == sorted(expected)  # every row exactly once
    for r in records:
        want = expected[r["id"]]
        assert (r["answer"], r["finish_reason"], r["prompt_tokens"], r["completion_tokens"]) == (
            want["answer"], want["finish_reason"], want["prompt_tokens"], want["completion_tokens"])  # fmt: skip
        assert (r["error"] is None) == (want["error"] is None) and r["prompt"] == DEFAULT
    assert expected["broken.png"]["error"] and expected["chelsea.png"]["error"] is None
    pipe.reset()
    ref = pipe.generate(DEFAULT, [str(folder / "chelsea.png")], CONFIG)
    assert expected["chelsea.png"]["answer"] == ref.text  # the single-machine path is Pipeline.generate

    # Rerun through the CLI: everything is done, nothing new is written; exit 1 = rows with errors.
    shards = sorted(out.iterdir())
    argv = ["batch", str(exports["llava-next"]), str(folder), "-o", str(out), "--ray", "--f32",
            "--max-new-tokens", "12"]  # fmt: skip
    assert main(argv) == 1
    assert sorted(out.iterdir()) == shards


def test_a_worker_that_crashes_is_reported_not_restarted_forever(local_ray, exports, folder, tmp_path):
    """A worker process dying (here SIGFPE while it loads the model, as OpenVINO's compiler once did)
    ended the run with a clear error instead of Ray restarting the actor forever (the run hung)."""
    import dataclasses
    import signal

    from llava_ov.errors import LlavaOvError
    from llava_ov.frontends.batch.on_ray import run_ray_batch

    @dataclasses.dataclass(frozen=True)
    class Crashing(PipelineSpec):  # defined here: pickled by value into the worker
        def load(self):
            os.kill(os.getpid(), signal.SIGFPE)

    with pytest.raises(LlavaOvError, match="a Ray worker failed: .*run again to resume"):
        run_ray_batch(Crashing(str(exports["llava"])), folder, tmp_path / "out", config=CONFIG, workers=1)


def test_a_row_that_kills_its_worker_becomes_an_error_and_the_run_finishes(local_ray, exports, folder, tmp_path):
    """A worker dying on one row (here SIGKILL, as an out-of-memory kill would) is restarted by Ray and its batch
    run again; the row it died on becomes an error record instead of killing worker after worker, and every
    other row is answered."""
    import dataclasses
    import signal

    from conftest import F32
    from llava_ov.frontends.batch.on_ray import WORKER_DIED, run_ray_batch

    @dataclasses.dataclass(frozen=True)
    class DiesOnRocket(PipelineSpec):  # defined here: pickled by value into the worker
        def load(self):
            pipe = super().load()

            class Dying:
                def generate(self, prompt, images, *args, **kwargs):
                    if any("rocket" in str(image) for image in images):
                        os.kill(os.getpid(), signal.SIGKILL)
                    return pipe.generate(prompt, images, *args, **kwargs)

            return Dying()

    spec = DiesOnRocket(str(exports["llava"]), LoadSettings(properties=F32, cache_dir=None))
    out = tmp_path / "out"
    summary = run_ray_batch(spec, folder, out, config=CONFIG, workers=1, batch_size=4)
    rows = {Path(r["image"]).stem: r for r in read_shards(out)}
    assert sorted(rows) == ["broken", "chelsea", "coffee", "rocket"] and not (out / ".attempts").exists()
    assert rows["rocket"]["error"] == WORKER_DIED
    assert rows["chelsea"]["error"] is None and rows["coffee"]["error"] is None and rows["broken"]["error"]
    assert (summary.succeeded, summary.failed) == (2, 2)
