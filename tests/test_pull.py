"""Models without torch: `llava-ov pull/run HUB_ID` on a repository that already holds an OpenVINO export
downloads only the export's files (huggingface_hub, against a stand-in Hub on loopback: it honours
HF_ENDPOINT), checks them and runs them in a process where torch and transformers cannot be imported;
a download killed half-way resumes where it stopped."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from conftest import serve_http

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "someone/tiny-llava-openvino"
NO_TORCH = ("import sys; [sys.modules.__setitem__(m, None) for m in ('torch', 'transformers', 'nncf')]; "
            "from llava_ov.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip


class Hub:
    """What the stand-in serves: repo id -> folder, plus a file whose first download stalls half-way."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.stall_file: str | None = None
        self.stalled = False
        self.release = threading.Event()

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                for repo, folder in hub.repos.items():
                    if path in (f"/api/models/{repo}", f"/api/models/{repo}/revision/main"):
                        return self._json(hub.info(repo, folder))
                    if path.startswith(f"/api/models/{repo}/tree/"):  # the file list snapshot_download reads
                        return self._json(hub.tree(folder))
                    prefix = f"/{repo}/resolve/"
                    if path.startswith(prefix):  # /resolve/<main or the commit>/<file>
                        name = path[len(prefix):].split("/", 1)[-1]
                        if (folder / name).is_file():
                            return self._file(folder / name, name, body)
                self.send_error(404)

            def _json(self, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _file(self, file: Path, name: str, body: bool) -> None:
                data = file.read_bytes()
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", SHA)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                if name == hub.stall_file and not hub.stalled:  # its first download stops after 3/4
                    hub.stalled = True
                    self.wfile.write(data[: len(data) * 3 // 4])
                    self.wfile.flush()
                    hub.release.wait(60)
                    return
                self.wfile.write(data[start:])

        return Handler

    @staticmethod
    def tree(folder: Path) -> list[dict]:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return [{"type": "file", "path": str(p.relative_to(folder)), "size": p.stat().st_size,
                 "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files]  # fmt: skip

    @staticmethod
    def info(repo: str, folder: Path) -> dict:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        siblings = [{"rfilename": str(p.relative_to(folder)), "size": p.stat().st_size} for p in files]
        return {"id": repo, "modelId": repo, "sha": SHA, "private": False, "siblings": siblings}


@pytest.fixture(scope="module")
def repo_folder(exports, tmp_path_factory) -> Path:
    """The tiny LLaVA export as a hub repository holds it, plus files a pull must not fetch."""
    folder = tmp_path_factory.mktemp("hub") / "repo"
    shutil.copytree(exports["llava"], folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)  # the checkpoint beside the export: not pulled
    (folder / "README.md").write_text("a model card\n")
    # a large IR file (the pattern pulls it): a kill after 3/4 of it leaves most of it to resume from
    (folder / "openvino_extra_model.bin").write_bytes(np.random.default_rng(0).bytes(16 * 2**20))
    return folder


@pytest.fixture()
def hub(repo_folder):
    state = Hub({REPO: repo_folder})
    with serve_http(state.handler()) as base:
        state.base = base
        yield state
        state.release.set()


def run_cli(hub: Hub, home: Path, *args: str, timeout: float = 300, wait: bool = True):
    env = {**os.environ, "HF_ENDPOINT": hub.base, "LLAVA_OV_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "0"}  # fmt: skip
    cmd = [sys.executable, "-c", NO_TORCH, *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_run_pulls_an_openvino_export_and_answers_without_torch(hub, tmp_path, exports):
    proc = run_cli(hub, tmp_path, "run", REPO, "--prompt", "Hello", "--max-new-tokens", "4", "--json", "--f32")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(answer["token_ids"]) == 4
    pulled = tmp_path / "models" / "someone--tiny-llava-openvino-ov"
    assert (pulled / "openvino_language_model.xml").is_file() and not (pulled / "model.safetensors").exists()
    assert not any(p.name == "README.md" for p in pulled.iterdir())
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path}
    assert "model.safetensors" not in fetched and "openvino_language_model.bin" in fetched
    again = run_cli(hub, tmp_path, "pull", REPO)  # cached: no download
    assert again.returncode == 0 and again.stdout.strip().endswith(str(pulled))


def test_a_killed_pull_resumes(hub, tmp_path):
    hub.stall_file = "openvino_extra_model.bin"
    first = run_cli(hub, tmp_path, "pull", REPO, wait=False)
    deadline = time.monotonic() + 120
    while not any(p[1].endswith(hub.stall_file) and p[0] == "GET" for p in hub.requests):
        assert time.monotonic() < deadline and first.poll() is None, "the pull never reached the large file"
        time.sleep(0.1)
    time.sleep(1.5)  # its first pieces written to the .incomplete file
    first.kill()
    first.wait(30)
    hub.release.set()
    proc = run_cli(hub, tmp_path, "pull", REPO)
    assert proc.returncode == 0, proc.stderr
    ranges = [r for method, path, r in hub.requests if method == "GET" and path.endswith(hub.stall_file)]
    assert ranges[0] is None and any(r and not r.startswith("bytes=0-") for r in ranges[1:])  # resumed, not restarted
    pulled = tmp_path / "models" / "someone--tiny-llava-openvino-ov"
    source = hub.repos[REPO] / hub.stall_file
    assert (pulled / hub.stall_file).read_bytes() == source.read_bytes()


def test_a_checkpoint_repository_still_needs_conversion(hub, tmp_path, checkpoints):
    hub.repos["someone/tiny-llava-checkpoint"] = checkpoints["llava"]
    proc = run_cli(hub, tmp_path, "pull", "someone/tiny-llava-checkpoint")
    assert proc.returncode == 2 and "conversion extra" in proc.stderr and "Traceback" not in proc.stderr
