"""Shared fixtures: tiny random-weight LLaVA checkpoints and their fp32 exports.

Built once per test session from the real config files (scaled down) with the
real Mistral tokenizer; real photos come from scikit-image.  Set
LLAVA_OV_TEST_CACHE to a folder to reuse the built models between sessions
(they are rebuilt when the llava_ov sources change).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}


def pytest_configure(config) -> None:
    """Tests write only under temporary folders: the models and compiled-model caches that commands use by
    default (`$LLAVA_OV_HOME`) go to one for the session, not the user's home (unless the caller set it)."""
    import tempfile

    if not os.environ.get("LLAVA_OV_HOME"):
        os.environ["LLAVA_OV_HOME"] = tempfile.mkdtemp(prefix="llava-ov-test-home-")
FAMILIES = {"llava-next": "llava-v1.6-mistral-7b-hf", "llava": "llava-1.5-7b-hf"}
VIDEO_CONFIG = "LLaVA-NeXT-Video-7B-hf"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")


def reply(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    """Send one whole response from a test handler (Content-Length set; header names with _ become -)."""
    handler.send_response(status)
    for name, value in {**headers, "Content_Length": str(len(body))}.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


@contextmanager
def serve_http(handler: type[http.server.BaseHTTPRequestHandler]):
    """Serve `handler` on a loopback port in a thread; yields the base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _source_digest() -> str:
    """A digest of the code that builds and converts the test models (export-time code and the families)."""
    src = Path(__file__).resolve().parents[1] / "src" / "llava_ov"
    h = hashlib.sha256()
    for path in sorted([*(src / "exporting").rglob("*.py"), *(src / "families").rglob("*.py")]):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def converted_pipeline(checkpoint: Path, out: Path):
    """A checkpoint converted to fp32 at `out`, loaded with the f32 pins (for the tests' one-off models)."""
    from llava_ov.exporting.convert import ConvertOptions, convert
    from llava_ov.runtime.pipeline import Pipeline

    export = convert(str(checkpoint), out, ConvertOptions(weight_format="fp32", show_progress=False))
    return Pipeline(export, properties=F32, cache_dir=None)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    cache = os.environ.get("LLAVA_OV_TEST_CACHE")
    if cache:
        root = Path(cache) / _source_digest()
        root.mkdir(parents=True, exist_ok=True)
        return root
    return tmp_path_factory.mktemp("models")


def _build_once(path: Path, build) -> Path:
    if (path / ".complete").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    build(path)
    (path / ".complete").write_text("ok")
    return path


@pytest.fixture(scope="session")
def checkpoints(model_root) -> dict[str, Path]:
    """family -> tiny random transformers checkpoint (fp32 weights)."""
    from llava_ov.exporting.random_models import RandomModelSpec, build_random_checkpoint

    return {
        fam: _build_once(model_root / f"hf-{fam}", lambda p, c=cfg: build_random_checkpoint(RandomModelSpec(c), p))
        for fam, cfg in FAMILIES.items()
    }


@pytest.fixture(scope="session")
def exports(model_root, checkpoints) -> dict[str, Path]:
    """family -> fp32 OpenVINO export of the tiny checkpoint."""
    from llava_ov.exporting.convert import ConvertOptions, convert

    def build(fam):
        opts = ConvertOptions(weight_format="fp32", overwrite=True, show_progress=False)
        return lambda p: convert(str(checkpoints[fam]), p, opts)

    return {fam: _build_once(model_root / f"ov-{fam}", build(fam)) for fam in FAMILIES}


@pytest.fixture(scope="session")
def video_checkpoint(model_root) -> Path:
    """A tiny random LLaVA-NeXT-Video checkpoint (the 7B's real config files, scaled down)."""
    from llava_ov.exporting.random_models import RandomModelSpec, build_random_checkpoint

    spec = RandomModelSpec(VIDEO_CONFIG)
    return _build_once(model_root / "hf-llava-next-video", lambda p: build_random_checkpoint(spec, p))


@pytest.fixture(scope="session")
def video_export(model_root, video_checkpoint) -> Path:
    """Its fp32 OpenVINO export (vision tower, projector and resampler as three models)."""
    from llava_ov.exporting.convert import ConvertOptions, convert

    opts = ConvertOptions(weight_format="fp32", overwrite=True, show_progress=False)
    return _build_once(model_root / "ov-llava-next-video", lambda p: convert(str(video_checkpoint), p, opts))


@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    """Real photographs shipped in scikit-image."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return {name.split(".")[0]: folder / name for name in PHOTOS}


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    """family -> (transformers model, processor) for reference outputs."""
    import transformers

    out = {}
    for fam, path in checkpoints.items():
        arch = "LlavaNextForConditionalGeneration" if fam == "llava-next" else "LlavaForConditionalGeneration"
        model = getattr(transformers, arch).from_pretrained(path, attn_implementation="sdpa").eval()
        out[fam] = (model, transformers.AutoProcessor.from_pretrained(path))
    return out


@pytest.fixture(scope="session")
def matrix_model(model_root):
    """config folder name -> (tiny random checkpoint, its fp32 export), each built once per session (or cache).

    VipLlava's tower keeps 12 layers: its feature layers reach back to -11."""
    from llava_ov.exporting.convert import ConvertOptions, convert
    from llava_ov.exporting.random_models import RandomModelSpec, build_random_checkpoint

    def get(name: str) -> tuple[Path, Path]:
        spec = RandomModelSpec(name, vision_layers=12 if name.startswith("vip") else None)
        checkpoint = _build_once(model_root / f"hf-{name}", lambda p: build_random_checkpoint(spec, p))
        opts = ConvertOptions(weight_format="fp32", overwrite=True, show_progress=False)
        return checkpoint, _build_once(model_root / f"ov-{name}", lambda p: convert(str(checkpoint), p, opts))

    return get
