"""Load settings declared once: every LoadSettings field is a flag on every front end, the flags build
the same settings back, and what bench and the server load honours every one of them."""

from __future__ import annotations

import time
from dataclasses import fields, replace

import pytest

from conftest import F32
from llava_ov.cli import build_parser
from llava_ov.errors import LlavaOvError
from llava_ov.runtime.settings import LoadSettings, _flag

# Every field away from its default (a new field must be added here: the test below checks that).
CHANGED = LoadSettings(
    device="AUTO", devices={"text_embeddings": "AUTO", "vision": "CPU"}, part_paths={"language": "other/int4"},
    properties=dict(F32), cache_dir=None, vision_encoder="float", kv_cache="paged", kv_cache_gb=0.05,
    max_step_tokens=64, max_running=3, decode_precision="same", vision_threads=1, vision_requests=2,
    dq_group_size="weights", draft="other/draft", draft_tokens=3, draft_max_running=5,
)  # fmt: skip

# The positional arguments each command needs besides the load flags.
COMMANDS = {
    "run": ["M", "--prompt", "p"], "chat": ["M"], "info": ["M"], "ui": ["M"], "serve": ["M"],
    "batch": ["M", "in", "-o", "out.jsonl"], "bench": ["M"], "evaluate": ["REF", "CAND"],
}  # fmt: skip


def parse(command: str, *argv: str):
    return build_parser().parse_args([command, *COMMANDS[command], *argv])


def option_strings(command: str) -> set[str]:
    sub = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command")
    return {s for action in sub.choices[command]._actions for s in action.option_strings}


def test_the_sample_changes_every_field():
    default = LoadSettings()
    assert [f.name for f in fields(LoadSettings) if getattr(CHANGED, f.name) == getattr(default, f.name)] == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_setting_is_a_flag_of_every_front_end(command):
    flags = option_strings(command)
    expected = {_flag(f) for f in fields(LoadSettings)}  # one flag per field, whatever fields are added
    assert len(expected) == len(fields(LoadSettings)) and expected <= flags
    assert {"--device", "--part-device", "--f32", "--kv-cache-gb", "--max-running", "--vision-threads"} <= expected


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_round_trip(command):
    argv = CHANGED.to_argv()
    assert LoadSettings.from_args(parse(command, *argv)) == CHANGED
    assert "--vision-threads" in argv and "--f32" in argv and "--part-device" in argv


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "evaluate"])
def test_no_flags_give_the_defaults(command):
    assert LoadSettings.from_args(parse(command)) == LoadSettings()


def test_evaluate_runs_the_int8_vision_encoder_unless_told():
    from llava_ov.tools.evaluate import EVALUATE_SETTINGS

    assert LoadSettings.from_args(parse("evaluate")) == EVALUATE_SETTINGS == LoadSettings(vision_encoder="int8")
    assert LoadSettings.from_args(parse("evaluate", "--vision-encoder", "auto")).vision_encoder == "auto"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(kv_cache_gb=0), "--kv-cache-gb must be > 0"),
        (dict(max_step_tokens=0), "--max-step-tokens must be >= 1"),
        (dict(max_running=0), "--max-running must be >= 1"),
        (dict(vision_threads=0), "--vision-threads must be >= 1"),
        (dict(vision_requests=0), "--vision-requests must be >= 1"),
        (dict(kv_cache="rolling"), "unknown KV cache kind 'rolling' \\(auto, paged, stateful\\)"),
        (dict(vision_encoder="int4"), "unknown vision encoder choice 'int4'"),
        (dict(decode_precision="f16"), "unknown decode precision 'f16'"),
        (dict(kv_cache="stateful", decode_precision="f32"), "needs the paged KV cache"),
        (dict(device="NPU", decode_precision="f32"), "needs the paged KV cache"),  # auto: stateful on NPU
    ],
)  # fmt: skip
def test_validate_says_what_is_wrong(change, message):
    with pytest.raises(LlavaOvError, match=message):
        LoadSettings(**change).validate()


def test_part_flags_refuse_unknown_parts():
    with pytest.raises(LlavaOvError, match="--part-device expects PART=DEVICE with PART one of vision"):
        LoadSettings.from_args(parse("run", "--part-device", "eyes=GPU"))
    with pytest.raises(LlavaOvError, match="--part-model expects PART=MODEL"):
        LoadSettings.from_args(parse("bench", "--part-model", "language"))


def test_overrides_name_fields_only():
    assert LoadSettings().with_overrides(max_running=2, device="GPU") == LoadSettings(device="GPU", max_running=2)
    with pytest.raises(TypeError, match="unknown load setting.*engine"):
        LoadSettings().with_overrides(engine=None)


def test_kv_backend_resolves_auto_for_the_language_device():
    assert LoadSettings().kv_backend() == "paged"
    assert LoadSettings(device="NPU").kv_backend() == "stateful"
    assert LoadSettings(devices={"language": "NPU.0"}).kv_backend() == "stateful"
    assert LoadSettings(device="NPU", devices={"language": "CPU"}).kv_backend() == "paged"


def test_settings_pickle_for_ray_actors():
    import pickle

    from llava_ov.frontends.batch.local import PipelineSpec

    spec = PipelineSpec("export", CHANGED)
    assert pickle.loads(pickle.dumps(spec)) == spec
    threaded = PipelineSpec("export", replace(CHANGED, device="CPU", properties={})).with_threads(2)
    assert threaded.settings.properties == {"INFERENCE_NUM_THREADS": 2} and threaded.settings.max_running == 3


# ----------------------------------------------------------------------------- what gets loaded

ENGINE_FLAGS = ["--f32", "--cache-dir", "off", "--kv-cache-gb", "0.05", "--max-running", "3", "--max-step-tokens", "48",
                "--part-device", "text_embeddings=AUTO", "--vision-threads", "1"]  # fmt: skip


def assert_loaded_with_engine_flags(pipe, kv_cache: str = "paged") -> None:
    """The pipeline runs what ENGINE_FLAGS ask for: engine limits, f32 pins, the part on AUTO, vision threads."""
    info = pipe.model.runtime_info()
    assert info["vision"]["INFERENCE_NUM_THREADS"] == "1"
    assert info["language"]["INFERENCE_PRECISION_HINT"] == "f32" and info["language"]["KV_CACHE_PRECISION"] == "f32"
    assert set(info["text_embeddings"]) == {"EXECUTION_DEVICES"}  # compiled by the AUTO plugin, not CPU's own
    assert pipe.model.kv_backend == kv_cache
    if kv_cache == "paged":
        config = pipe.engine.config
        assert (config.kv_cache_gb, config.max_running, config.max_step_tokens) == (0.05, 3, 48)
        assert pipe.max_concurrency == 3
        assert pipe.engine.pool.num_blocks == int(0.05 * 2**30 // pipe.model.paged.bytes_per_block)


def test_bench_loads_ours_with_every_engine_setting(exports, photos):
    """`bench` (and its decode variants, and --concurrency's engines) run what the server runs."""
    from llava_ov.tools.bench import bench_options, make_engine
    from llava_ov.tools.bench_serving import FifoServing, OursServing

    argv = ["bench", str(exports["llava-next"]), "--image", str(photos["coffee"]), *ENGINE_FLAGS]
    args = build_parser().parse_args(argv)
    opts = bench_options(args)
    assert opts.load == LoadSettings.from_args(args) != LoadSettings()
    loaded = [make_engine("ours", opts), make_engine("ours-same-decode", opts)]
    assert loaded[1].name == "ours-same-decode" and loaded[1].pipe.model.settings.decode_precision == "same"
    loaded += [OursServing(opts.model, opts.load), FifoServing(opts.model, opts.load)]
    try:
        for engine in loaded[:3]:
            assert_loaded_with_engine_flags(engine.pipe)
        assert_loaded_with_engine_flags(loaded[3].pipe, kv_cache="stateful")
    finally:
        for engine in loaded:
            engine.pipe.close()


def test_the_servers_default_loader_honours_every_setting(exports):
    """`llava-ov serve` flags -> ServerSettings.load -> the app's own loader: all of them reach the pipeline."""
    from fastapi.testclient import TestClient

    from llava_ov.frontends.server import create_app
    from llava_ov.frontends.server.cli import settings_from_args

    args = build_parser().parse_args(["serve", str(exports["llava-next"]), *ENGINE_FLAGS, "--max-queue", "5"])
    settings = settings_from_args(args)
    assert settings.load == LoadSettings.from_args(args) and settings.max_queue == 5
    app = create_app(settings)  # no factory: the server loads settings.model with settings.load
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while True:
            status = app.state.server.status  # read before asking: loading may end in between
            if client.get("/health").status_code == 200:
                break
            assert time.monotonic() < deadline and status == "loading", status
            time.sleep(0.05)
        assert_loaded_with_engine_flags(app.state.server.worker.pipeline)


def test_the_servers_default_loader_refuses_bad_settings_before_loading(tmp_path):
    from llava_ov.frontends.server.app import load_pipeline
    from llava_ov.frontends.server.settings import ServerSettings

    with pytest.raises(LlavaOvError, match="--max-running must be >= 1"):
        load_pipeline(ServerSettings(model=str(tmp_path / "missing"), load=LoadSettings(max_running=0)))


def test_unknown_parts_are_refused_in_the_api_too():
    from llava_ov.errors import LlavaOvError
    from llava_ov.runtime.settings import LoadSettings

    with pytest.raises(LlavaOvError, match="devices: unknown part visoin"):
        LoadSettings(devices={"visoin": "GPU"}).validate()
    with pytest.raises(LlavaOvError, match="part_paths: unknown part lm"):
        LoadSettings(part_paths={"lm": "x.xml"}).validate()
