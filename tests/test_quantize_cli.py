"""`llava-ov compress` and `llava-ov evaluate` as users run them.

The happy path runs in subprocesses (the real command); the bad-input cases run
`cli.main` in-process (same code path, much faster) and must each end with exit
status 2 and a single `error:` line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from llava_ov import cli
from llava_ov.exporting.quantize import weight_stats
from llava_ov.runtime.export import ExportDir


def run_cli(*args, env=None, timeout=300):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llava_ov.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def photo_folder(photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    for name in ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left"):
        shutil.copy(photos[name], folder / photos[name].name)
    return folder


@pytest.fixture(scope="module")
def compressed_cli(exports, photo_folder, tmp_path_factory):
    """(process, output dir) of `llava-ov compress` with int4 LM and INT8-PTQ vision on 4 folder images."""
    out = tmp_path_factory.mktemp("cli") / "int4-ptq"
    proc = run_cli("compress", exports["llava-next"], "-o", out, "--lm", "int4_sym", "--group-size", "64",
                   "--vision", "int8_ptq", "--calib-images", "4", "--calibration", photo_folder)  # fmt: skip
    return proc, out


def test_compress_happy_path(compressed_cli, photo_folder):
    proc, out = compressed_cli
    assert proc.returncode == 0, proc.stderr
    assert f"-> {out}" in proc.stdout and "language" in proc.stdout and "vision" in proc.stdout
    assert "[compress 1/" in proc.stderr  # progress phases
    # one line per phase: none of NNCF's progress bars or tables
    noise = proc.stdout + proc.stderr
    assert "━" not in noise and "Statistics collection" not in noise, noise
    info = ExportDir.open(out).record()
    assert info.parts["language"]["precision"] == "int4_sym g64 r0.6 + int8"
    assert info.parts["vision"]["precision"] == "int8_ptq"
    assert info.parts["text_embeddings"]["precision"] == "int8_asym"
    calib = info.compression["calibration"]
    assert calib["images"] == 4 and str(photo_folder) in calib["source"]
    assert {"i4", "u4"} & set(weight_stats(out / "openvino_language_model.xml")["weights"])
    assert weight_stats(out / "openvino_vision_embeddings_model.xml")["fake_quantize"] > 0


def test_evaluate_prints_table_and_writes_json(compressed_cli, exports, photos, tmp_path):
    _, out = compressed_cli
    report_path = tmp_path / "q" / "report.json"
    proc = run_cli("evaluate", exports["llava-next"], out, "--images", photos["chelsea"], "--prompts", "What is it?",
                   "Describe it.", "--max-new-tokens", "6", "--f32", "--json", report_path,
                   env={"XDG_CACHE_HOME": str(tmp_path)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "top-1" in proc.stdout and "KL mean" in proc.stdout and "vision features" in proc.stdout
    report = json.loads(report_path.read_text())
    assert len(report["samples"]) == 2 and report["settings"]["max_new_tokens"] == 6
    assert report["properties"] == {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    agg = report["aggregate"]
    assert 0 <= agg["top1_agreement"] <= 1 and agg["kl_mean"] >= 0 and 0 < agg["vision_cosine"] < 1
    assert report["candidate"]["precision"]["vision"] == "int8_ptq"


@pytest.fixture
def empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    return tmp_path / "empty"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lm", "int3"], "unknown language-model mode 'int3'"),
        (["--vision", "int4"], "unknown vision mode 'int4'"),
        (["--group-size", "7"], "group size 7 does not divide"),
        (["--group-size", "0"], "group size must be a positive integer or -1"),
        (["--ratio", "1.5"], "ratio must be in (0, 1]"),
        (["--lm", "int8", "--awq"], "awq needs an int4"),
        (["--vision", "int8_ptq", "--calibration", "EMPTY"], "holds no image files"),
        (["--vision", "int8_ptq", "--calibration", "/no/such/folder"], "no such calibration folder"),
        (["--lm", "none"], "nothing to compress"),
    ],
)
def test_compress_bad_inputs_are_one_line_errors(extra, message, exports, empty_folder, tmp_path, capsys):
    extra = [str(empty_folder) if arg == "EMPTY" else arg for arg in extra]
    code = cli.main(["compress", str(exports["llava"]), "-o", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_compress_refuses_existing_output_and_source(exports, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    for out, message in ((taken, "already exists; pass --overwrite"), (exports["llava"], "is the source export")):
        code = cli.main(["compress", str(exports["llava"]), "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert (taken / "keep.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1


def test_compress_error_in_a_real_process_is_one_line(exports, tmp_path):
    proc = run_cli("compress", exports["llava"], "-o", tmp_path / "out", "--lm", "int3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: unknown language-model mode 'int3'; valid modes: int4_sym, int4_asym, int8, none"]


def test_evaluate_bad_image_is_one_line_error(exports, tmp_path, capsys):
    code = cli.main(["evaluate", str(exports["llava"]), str(exports["llava"]), "--images", str(tmp_path / "no.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err


def test_help_lists_the_runtime_modes():
    from llava_ov.exporting import quantize
    from llava_ov.frontends import compress as quantize_cli

    assert quantize_cli.LM_MODES == " | ".join(quantize.LM_MODES)  # the light CLI module mirrors them for --help
    assert quantize_cli.VISION_MODES == " | ".join(quantize.VISION_MODES)
