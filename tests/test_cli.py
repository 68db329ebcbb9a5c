"""The `llava-ov` command line, run as users run it (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import F32
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Pipeline


def cli(*args, env=None, stdin=None, timeout=300):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llava_ov.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env=full_env, timeout=timeout)  # fmt: skip


def cli_on_terminal(*args, timeout=300) -> str:
    """What the CLI writes to stderr when stderr is a terminal (a pseudo-terminal here)."""
    import pty

    leader, follower = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llava_ov.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=follower, env=env)  # fmt: skip
    os.close(follower)
    out = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        out += data
    proc.wait(timeout)
    os.close(leader)
    return out.decode(errors="replace")


def assert_clean_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert pattern in proc.stderr, proc.stderr


def test_run_json_equals_pipeline(exports, photos):
    proc = cli("run", exports["llava-next"], "--image", photos["chelsea"], "--prompt", "What is it?",
               "--max-new-tokens", "12", "--json", "--f32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"text", "token_ids", "finish_reason", "timings", "prompt_tokens"} <= out.keys()
    assert out["timings"]["ttft_s"] > 0 and out["timings"]["vision_s"] > 0
    ref = Pipeline(exports["llava-next"], properties=F32, cache_dir=None)
    expected = ref.generate("What is it?", [photos["chelsea"]], GenerationConfig(max_new_tokens=12))
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text


def test_run_streams_text(exports, photos):
    proc = cli("run", exports["llava"], "--image", photos["coffee"], "--prompt", "Describe.", "--max-new-tokens", "8",
               "-v")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "tokens/s" in proc.stderr


def test_run_bad_inputs_are_one_line_errors(exports, tmp_path):
    assert_clean_error(cli("run", exports["llava"], "--image", tmp_path / "no.png", "--prompt", "x"), "error:")
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    assert_clean_error(cli("run", exports["llava"], "--image", tmp_path / "bad.jpg", "--prompt", "x"), "error:")
    assert_clean_error(cli("run", tmp_path / "missing-model", "--prompt", "x"), "no such model directory")
    assert_clean_error(cli("run", "some-org/not-a-model", "--prompt", "x"), "not in the local Hugging Face cache")  # the tests run with HF_HUB_OFFLINE=1


def test_convert_errors(tmp_path, exports, checkpoints):
    assert_clean_error(cli("convert", tmp_path / "nope", "-o", tmp_path / "out"), "no such directory")
    assert_clean_error(cli("convert", exports["llava"], "-o", tmp_path / "out"), "already a llava-ov export")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert_clean_error(cli("convert", checkpoints["llava"], "-o", tmp_path / "taken"), "already exists")


def test_chat_commands_and_follow_up(exports, photos):
    script = f"/image {photos['rocket']}\nWhat is this?\nAnd the colours?\n/reset\n/image /no/such.png\n/exit\n"
    proc = cli("chat", exports["llava-next"], "--max-new-tokens", "6", stdin=script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2
    assert "conversation cleared" in proc.stdout and "error:" in proc.stdout


def test_checkpoint_dir_is_converted_once_into_the_cache(checkpoints, photos, tmp_path):
    env = {"LLAVA_OV_HOME": str(tmp_path)}
    args = ("run", checkpoints["llava"], "--weight-format", "fp32", "--image", photos["coffee"], "--prompt", "Hi",
            "--max-new-tokens", "4")  # fmt: skip
    first = cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "converting" in first.stdout + first.stderr
    assert "random weights" in first.stderr  # the demo warning travels with the export
    second = cli(*args, env=env)
    assert second.returncode == 0 and "converting" not in second.stdout + second.stderr


def test_demo_model_command(tmp_path):
    proc = cli("demo-model", tmp_path / "demo", "--family", "llava")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM weights" in proc.stdout
    info = cli("info", tmp_path / "demo")
    assert info.returncode == 0 and json.loads(info.stdout)["family"] == "llava"


@pytest.mark.parametrize("command", ["convert", "run", "chat", "demo-model", "info"])
def test_help(command):
    assert cli(command, "--help").returncode == 0


def test_engine_options_and_progress(exports, photos):
    """--kv-cache stateful gives the same tokens as the engine; -v shows prefill progress; bad values are clean errors."""
    common = ("run", exports["llava-next"], "--image", photos["chelsea"], "--prompt", "What is it?",
              "--max-new-tokens", "8", "--f32")  # fmt: skip
    paged = cli(*common, "--json", "--max-step-tokens", "64", "--kv-cache-gb", "0.05")
    stateful = cli(*common, "--json", "--kv-cache", "stateful")
    assert paged.returncode == 0 and stateful.returncode == 0, paged.stderr + stateful.stderr
    assert json.loads(paged.stdout)["token_ids"] == json.loads(stateful.stdout)["token_ids"]
    verbose = cli(*common, "-v", "--max-step-tokens", "64")  # stderr a pipe: the summary, no redrawn progress line
    assert verbose.returncode == 0 and "prompt tokens" in verbose.stderr, verbose.stderr
    assert "\r" not in verbose.stderr and "\x1b" not in verbose.stderr
    assert "[prefill 64/" in cli_on_terminal(*common, "-v", "--max-step-tokens", "64")  # a terminal: the progress
    assert_clean_error(cli(*common, "--kv-cache-gb", "0"), "--kv-cache-gb must be > 0")
    assert_clean_error(cli(*common, "--max-step-tokens", "0"), "--max-step-tokens must be >= 1")


def test_huge_max_new_tokens_is_capped_and_said(exports):
    proc = cli("run", exports["llava"], "--prompt", "hi", "--max-new-tokens", "100000000", "--f32", "--json",
               "--kv-cache-gb", "0.01")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "capped by the model's context" in proc.stderr
    assert json.loads(proc.stdout)["finish_reason"] in ("eos", "length")


def test_serve_refuses_an_out_of_range_port(exports):
    proc = cli("serve", exports["llava"], "--port", "99999")
    assert proc.returncode == 2 and "port 99999 is out of range" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_device_names_the_reason_and_the_devices(exports):
    proc = cli("run", exports["llava"], "--prompt", "hi", "--device", "NPU")
    assert_clean_error(proc, "cannot compile")
    assert "devices on this machine: CPU" in proc.stderr and "core.cpp" not in proc.stderr


@pytest.mark.parametrize(
    "argv, module, hint",
    [
        (["bench", "{model}", "--compare", "genai", "--runs", "1"], "openvino_genai", "llava-ov[bench]"),
        (["batch", "{model}", "{tmp}", "-o", "{tmp}/out.parquet"], "pyarrow", "llava-ov[batch]"),
        (["ui", "{model}"], "gradio", "llava-ov[ui]"),
    ],
)
def test_missing_extras_print_the_pip_command(argv, module, hint, exports, tmp_path):
    """An optional package that is not installed: one line naming the extra, before the model loads."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    args = [a.format(model=exports["llava"], tmp=tmp_path) for a in argv]
    proc = cli(*args, env={"PYTHONPATH": str(blocker)}, timeout=120)
    assert_clean_error(proc, f"pip install '{hint}'")


def test_an_unreachable_hub_fails_fast_in_one_line():
    """No HF_HUB_OFFLINE: a hub id on a machine that cannot resolve the Hub fails at once, not after retries."""
    import time

    start = time.monotonic()
    proc = cli("run", "some-org/not-a-model", "--prompt", "x",
               env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid"}, timeout=60)  # fmt: skip
    assert_clean_error(proc, "cannot be reached")
    assert time.monotonic() - start < 15 and "hub.invalid" in proc.stderr


def test_demo_model_and_compress_print_phases_not_library_chatter(tmp_path):
    built = cli("demo-model", tmp_path / "demo")
    assert built.returncode == 0, built.stderr
    assert "Loading weights" not in built.stdout + built.stderr and "Writing model shards" not in built.stderr
    assert "[convert 6/6]" in built.stdout + built.stderr
    compressed = cli("compress", tmp_path / "demo", "-o", tmp_path / "int4", "--lm", "int4_sym")
    assert compressed.returncode == 0, compressed.stderr
    assert "Statistics of the bitwidth distribution" not in compressed.stdout + compressed.stderr


def test_run_json_schema_prints_only_the_json(exports, photos, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"animal": {"enum": ["cat", "dog"]},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
              "required": ["animal", "legs"], "additionalProperties": False}  # fmt: skip
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    common = ("run", exports["llava"], "--image", photos["chelsea"], "--prompt", "JSON please.", "--json-schema", path)
    proc = cli(*common, "--max-new-tokens", "60")
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), schema)  # stdout is the JSON and nothing else
    cut = cli(*common, "--max-new-tokens", "2")
    assert cut.returncode == 1 and "raise --max-new-tokens" in cut.stderr and "Traceback" not in cut.stderr
    (tmp_path / "bad.json").write_text("{oops")
    assert_clean_error(cli("run", exports["llava"], "--prompt", "x", "--json-schema", tmp_path / "bad.json"), "not JSON")
    (tmp_path / "odd.json").write_text('{"type": "string", "format": "nope"}')
    odd = cli("run", exports["llava"], "--image", photos["chelsea"], "--prompt", "x", "--json-schema", tmp_path / "odd.json")
    assert_clean_error(odd, "Unknown format")


@pytest.mark.parametrize("flag", [("--max-image-tokens", "1200"), ("--visual-token-pruning", "0.75")])
def test_run_verbose_reports_image_tokens_kept_of_total(exports, photos, flag):
    proc = cli("run", exports["llava-next"], "--image", photos["chelsea"], "--prompt", "Describe.",
               "--max-new-tokens", "4", "-v", *flag)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\d+ of \d+ image tokens kept", proc.stderr), proc.stderr


def test_run_refuses_a_pruning_ratio_out_of_range_before_loading(tmp_path):
    proc = cli("run", tmp_path / "missing", "--prompt", "x", "--visual-token-pruning", "1.5")
    assert proc.returncode != 0 and "visual_token_pruning must be in [0, 0.99]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_models_lists_and_removes_cached_exports(exports, tmp_path, monkeypatch, capsys):
    """`llava-ov models` lists the cache (size, family, format, source) and `models rm NAME` removes one."""
    import shutil

    from llava_ov.cli import main

    monkeypatch.setenv("LLAVA_OV_HOME", str(tmp_path))
    cache = tmp_path / "models"
    shutil.copytree(exports["llava"], cache / "tiny-llava-fp32")
    (cache / "half-done-int4").mkdir()  # an interrupted conversion: no language model
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert set(listed) == {"tiny-llava-fp32", "half-done-int4"}
    tiny = listed["tiny-llava-fp32"]
    assert tiny["family"] == "llava" and tiny["weight_format"] == "fp32" and tiny["complete"] and tiny["size_bytes"] > 1e6
    assert not listed["half-done-int4"]["complete"]
    assert main(["models"]) == 0
    assert "incomplete" in capsys.readouterr().out
    assert main(["models", "rm", "no-such-model"]) == 2
    assert "no cached model named 'no-such-model'" in capsys.readouterr().err
    assert main(["models", "rm", "tiny-llava-fp32"]) == 0
    assert not (cache / "tiny-llava-fp32").exists() and (cache / "half-done-int4").exists()


def test_one_name_everywhere_for_a_demo_model(tmp_path):
    """The page, info and the server name a model the same way, from its export: a demo model is its folder,
    and its recorded source is what it is, not the temporary folder it was built in."""
    from llava_ov.frontends.ui import describe_pipeline

    proc = cli("demo-model", tmp_path / "my-demo", "--family", "llava")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(cli("info", tmp_path / "my-demo").stdout)
    assert info["name"] == "my-demo" and "demo-model" in info["export"]["source"]
    assert "/tmp" not in info["export"]["source"] and "`my-demo`" in describe_pipeline(info)
