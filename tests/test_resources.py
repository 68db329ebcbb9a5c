"""The memory and disk guard of convert / compress: refuses before any heavy work, says what fits."""

from __future__ import annotations

import pytest

from llava_ov.common import hardware
from llava_ov.exporting import resources
from llava_ov.exporting.convert import ConvertOptions, convert
from llava_ov.errors import LlavaOvError
from llava_ov.exporting.quantize import QuantConfig, compress_export

GIB = resources.GIB


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Loading a checkpoint or reading an IR fails the test: the guard must refuse first."""
    import openvino as ov

    import llava_ov.exporting.convert as convert_mod

    def forbidden(*args, **kwargs):
        raise AssertionError("heavy work started before the resource check refused")

    monkeypatch.setattr(convert_mod, "load_checkpoint", forbidden)
    monkeypatch.setattr(ov.Core, "read_model", forbidden)


def fake(monkeypatch, memory=None, disk=None):
    if memory is not None:
        monkeypatch.setattr(resources, "available_memory", lambda: int(memory))
    if disk is not None:
        monkeypatch.setattr(resources, "free_disk", lambda path: int(disk))


def test_convert_refuses_when_memory_is_short(checkpoints, tmp_path, monkeypatch, no_heavy_work):
    fake(monkeypatch, memory=1.5 * GIB)
    out = tmp_path / "out"
    with pytest.raises(LlavaOvError) as err:
        convert(str(checkpoints["llava-next"]), out, ConvertOptions(weight_format="int4", show_progress=False))
    message = str(err.value)
    assert "will not fit this machine" in message and "1.5 GiB is available" in message
    assert "GiB of memory outright" in message and "--skip-resource-check" in message
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing staged, nothing left behind


def test_convert_refuses_when_disk_is_short(checkpoints, tmp_path, monkeypatch, no_heavy_work):
    fake(monkeypatch, disk=1_000_000)
    with pytest.raises(LlavaOvError, match=r"writes about \d+ MB to .*, which has 1 MB free"):
        convert(str(checkpoints["llava"]), tmp_path / "out", ConvertOptions(show_progress=False))


@pytest.mark.parametrize("weight_format", ["fp32", "int4"])  # int4: the compression step is not re-checked
def test_convert_skip_resource_check_runs_anyway(weight_format, checkpoints, tmp_path, monkeypatch):
    fake(monkeypatch, memory=1.5 * GIB, disk=1_000_000)
    opts = ConvertOptions(weight_format=weight_format, show_progress=False, check_resources=False)
    out = convert(str(checkpoints["llava"]), tmp_path / "out", opts)
    assert (out / "openvino_language_model.xml").is_file()


def test_convert_estimate_scales_with_the_checkpoint():
    small = resources.convert_need(1e9, 2, "fp16", "out", 0.9)
    big = resources.convert_need(15.1e9, 2, "int4", "out", 0.95)
    assert big.peak_bytes > small.peak_bytes and big.file_bytes == pytest.approx(15.1e9)
    assert big.disk_bytes > 15.1e9  # the fp16 IR, then the INT4 LM beside it
    assert resources.convert_need(30.2e9, 4, "fp16", "out", 0.95).disk_bytes == pytest.approx(15.1e9)


def test_compress_ptq_refusal_says_how_many_images_fit(exports, tmp_path, monkeypatch, no_heavy_work):
    memory = int(resources.PTQ_ANON_FIXED + resources.WORKING_SET + 100.5 * resources.PTQ_ANON_PER_IMAGE)
    fake(monkeypatch, memory=memory)
    q = QuantConfig(lm_mode="none", vision_mode="int8_ptq", vision_calib_images=500)
    with pytest.raises(LlavaOvError) as err:
        compress_export(exports["llava-next"], tmp_path / "out", q, progress=False)
    fits = resources.Scalable("--calib-images", resources.PTQ_ANON_FIXED, resources.PTQ_ANON_PER_IMAGE, 500)
    n = fits.largest_fitting(memory)
    assert n == 100 and "--calib-images 100 would fit (asked: 500)" in str(err.value)
    assert "weight-only INT8" in str(err.value)
    need = resources.compress_need(1e6, 1e6, "none", tmp_path, ptq_images=n)
    resources.check(need, memory=memory, disk=10**12)  # the suggestion really fits
    with pytest.raises(LlavaOvError):
        resources.check(resources.compress_need(1e6, 1e6, "none", tmp_path, ptq_images=n + 1), memory=memory,
                        disk=10**12)  # fmt: skip


def test_compress_awq_refusal_suggests_fewer_prompts_or_data_free(exports, tmp_path, monkeypatch, no_heavy_work):
    fake(monkeypatch, memory=2.5 * GIB)
    q = QuantConfig(awq=True, calib_samples=64, ratio=1.0)
    with pytest.raises(LlavaOvError, match=r"--calib-samples \d+ would fit \(asked: 64\).*leave out --awq"):
        compress_export(exports["llava-next"], tmp_path / "out", q, progress=False)


def test_fits_only_with_reread_weights_is_a_warning(tmp_path, caplog):
    need = resources.convert_need(15.1e9, 2, "fp16", tmp_path, 0.95)
    memory = int(need.anon_bytes + resources.WORKING_SET + 1 * GIB)  # enough outright, less than the peak
    with caplog.at_level("WARNING"):
        resources.check(need, memory=memory, disk=10**12)
    assert "re-read weights from disk" in caplog.text


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_limit_caps_available_memory(tmp_path, version):
    """The room under a cgroup limit is the limit minus the group's anonymous memory: page cache (here 9 GiB
    of it, as a just-written IR leaves) is reclaimed before anything is killed, so it does not count."""
    root = tmp_path / "cg"
    if version == "v1":
        group = root / "memory" / "job"
        proc = "12:memory:/job\n3:cpu,cpuacct:/job\n"
        limit, stat = "memory.limit_in_bytes", f"cache {9 * GIB}\nrss 1\ntotal_cache {9 * GIB}\ntotal_rss {4 * GIB}\n"
    else:
        group = root / "job"
        proc = "0::/job\n"
        limit, stat = "memory.max", f"anon {4 * GIB}\nfile {9 * GIB}\n"
    group.mkdir(parents=True)
    (group / limit).write_text(str(16 * GIB))
    (group / "memory.stat").write_text(stat)
    (tmp_path / "cgroup").write_text(proc)
    assert hardware._cgroup_room(str(tmp_path / "cgroup"), str(root)) == 12 * GIB
    (group / limit).write_text("max\n" if version == "v2" else str(2**63 - 4096))
    assert hardware._cgroup_room(str(tmp_path / "cgroup"), str(root)) is None
