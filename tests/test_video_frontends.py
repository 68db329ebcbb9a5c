"""Video through every front end (CLI, chat, server, batch, page) on the tiny LLaVA-NeXT-Video export,
each equal to Pipeline.generate on the same video (which equals transformers: test_video_family.py),
and hostile videos refused by the server quickly, in bounded memory, with the server healthy after."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import F32, serve_http
from llava_ov.errors import LlavaOvError
from llava_ov.frontends.server.app import create_app
from llava_ov.frontends.server.settings import ServerSettings
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from llava_ov.runtime.settings import LoadSettings
from test_server import assert_error, assert_healthy, running, wait_ready
from videos import repeated, two_frames_apart, video_bytes, write_video

FRAMES = 4
CONFIG = GenerationConfig(max_new_tokens=8, num_frames=FRAMES)
PROMPT = "What happens in this video?"
HTTP = httpx.Client(timeout=60)


def photo_frame(photo: Image.Image):
    """A frame maker for write_video: a pan across a real photo (the model sees real content)."""

    def frame(i: int, width: int, height: int) -> np.ndarray:
        return np.asarray(photo.crop((12 * i, 6 * i, 12 * i + width, 6 * i + height)))

    return frame


@pytest.fixture(scope="module")
def clip(tmp_path_factory, photos) -> Path:
    """A 12-frame 160x120 H.264 mp4 of a pan across a photo."""
    path = tmp_path_factory.mktemp("video") / "pan.mp4"
    return write_video(path, 12, size=(160, 120), fps=12, frame=photo_frame(Image.open(photos["astronaut"]).convert("RGB")))


@pytest.fixture(scope="module")
def vpipe(video_export) -> Pipeline:
    return Pipeline(video_export, properties=F32, cache_dir=None)


@pytest.fixture(scope="module")
def reference(vpipe, clip):
    return vpipe.generate(PROMPT, config=CONFIG, videos=[clip])


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def video_request(url: str, stream: bool = False, **extra) -> dict:
    content = [{"type": "text", "text": PROMPT}, {"type": "video_url", "video_url": {"url": url}}]
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "num_frames": FRAMES, "stream": stream, **extra}  # fmt: skip


def post(base: str, body: dict) -> httpx.Response:
    return HTTP.post(f"{base}/v1/chat/completions", json=body)


# ----------------------------------------------------------------------------- Python API and CLI


def test_reference_counts_video_tokens(reference):
    assert (reference.video_frames, reference.video_tokens, reference.image_tokens) == (FRAMES, FRAMES * 144, 0)
    assert reference.token_ids and "video (4 frames)" in reference.image_token_note()


def test_cli_run_video_json_equals_pipeline(video_export, clip, reference):
    proc = subprocess.run([sys.executable, "-m", "llava_ov.cli", "run", str(video_export), "--video", str(clip),
                           "--prompt", PROMPT, "--num-frames", str(FRAMES), "--max-new-tokens", "8", "--json", "--f32"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["token_ids"] == reference.token_ids and out["video_tokens"] == FRAMES * 144


def test_cli_bad_video_is_one_line_error(video_export, tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"not a video at all" * 10)
    proc = subprocess.run([sys.executable, "-m", "llava_ov.cli", "run", str(video_export), "--video", str(fake),
                           "--prompt", "hi", "--f32"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "video" in proc.stderr.lower()


def test_terminal_chat_video_command(vpipe, clip, reference):
    from llava_ov.frontends.terminal import run_terminal_chat

    out = io.StringIO()
    run_terminal_chat(vpipe, CONFIG, stdin=io.StringIO(f"/video {clip}\n{PROMPT}\n/exit\n"), stdout=out)
    assert f"(video {clip} will go with your next message)" in out.getvalue()
    assert f"assistant> {reference.text}" in out.getvalue()


def test_image_only_model_refuses_a_video_clearly(exports, clip):
    pipe = Pipeline(exports["llava"], properties=F32, cache_dir=None)
    with pytest.raises(LlavaOvError, match="takes no video"):
        pipe.generate("hi", videos=[clip])


# ----------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server(video_export):
    settings = ServerSettings(model=str(video_export), load=LoadSettings(properties=F32, cache_dir=None))
    with running(create_app(settings)) as base:
        wait_ready(base)
        yield base


def test_server_video_url_equals_pipeline(server, clip, reference):
    body = post(server, video_request(data_url(clip.read_bytes()))).json()
    assert body["choices"][0]["message"]["content"] == reference.text
    usage = body["usage"]
    assert (usage["video_tokens"], usage["video_frames"], usage["prompt_tokens"]) == (
        FRAMES * 144, FRAMES, reference.prompt_tokens)


def test_server_streams_a_video_answer(server, clip, reference):
    with HTTP.stream("POST", f"{server}/v1/chat/completions", json=video_request(data_url(clip.read_bytes()), True)) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == reference.text


def test_server_takes_frames_as_images(server, vpipe, photos):
    frames = [Image.open(photos["coffee"]).convert("RGB").rotate(10 * i) for i in range(3)]
    urls = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.save(buffer, format="PNG")
        urls.append(data_url(buffer.getvalue(), "image/png"))
    content = [{"type": "text", "text": PROMPT}, {"type": "video", "video": urls}]
    body = post(server, {"messages": [{"role": "user", "content": content}], "max_tokens": 8}).json()
    expected = vpipe.generate(PROMPT, config=GenerationConfig(max_new_tokens=8), videos=[frames])
    assert body["choices"][0]["message"]["content"] == expected.text and body["usage"]["video_frames"] == 3


def hostile(kind: str, tmp: Path) -> bytes:
    """Small files of each hostile class."""
    if kind == "resolution bomb":  # frames over the pixel limit
        return repeated(tmp / "big.mp4", 2, size=(4608, 2592)).read_bytes()
    if kind == "decompression bomb":  # 3,000 4096x2304 frames of one picture in ~130 KB
        return repeated(tmp / "bomb.mp4", 3000, size=(4096, 2304)).read_bytes()
    if kind == "10,000 frames":
        return repeated(tmp / "many.mp4", 10_000, size=(16, 16)).read_bytes()
    if kind == "2-hour duration":
        return two_frames_apart(tmp / "long.mp4", 7200).read_bytes()
    if kind == "truncated":
        whole = video_bytes(24, size=(64, 32))
        return whole[: len(whole) // 2]
    if kind == "not a video":
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buffer, format="PNG")
        return buffer.getvalue()
    return np.random.default_rng(0).bytes(50_000)  # random bytes


@pytest.mark.parametrize("kind", ["resolution bomb", "decompression bomb", "10,000 frames", "2-hour duration", "truncated", "not a video",
                                  "random bytes"])  # fmt: skip
def test_hostile_videos_are_refused_fast_in_bounded_memory(server, kind, tmp_path):
    data = hostile(kind, tmp_path)
    process = psutil.Process()
    before, started = process.memory_info().rss, time.perf_counter()
    response = post(server, video_request(data_url(data)))
    elapsed, grown = time.perf_counter() - started, process.memory_info().rss - before
    assert_error(response, 400, "invalid_video")
    assert elapsed <= 5.0 and grown <= 300 * 2**20, (elapsed, grown)
    assert_healthy(server)


def test_video_url_redirecting_to_a_private_address_is_refused(server):
    """The first hop is refused already here (loopback); a public host redirecting inward is covered by the
    shared fetcher's own tests and by the next test."""
    started = time.perf_counter()
    assert_error(post(server, video_request("http://127.0.0.1:9/v.mp4")), 400, "invalid_video")
    assert time.perf_counter() - started <= 5.0
    assert_healthy(server)


def test_video_loader_refuses_a_redirect_to_link_local():
    import asyncio
    import http.server

    from llava_ov.frontends.server.videos import VideoLoader, VideoPolicy
    from llava_ov.runtime.fetch import is_public_ip
    from llava_ov.runtime.video import InvalidVideoError

    class LoopbackOnly(VideoPolicy):  # the test host on 127.0.0.1 stands in for a public one
        def ip_allowed(self, ip) -> bool:
            return str(ip) == "127.0.0.1" or is_public_ip(ip)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()

        def log_message(self, *args):
            pass

    with serve_http(Handler) as host, pytest.raises(InvalidVideoError, match="private or link-local"):
        asyncio.run(VideoLoader(LoopbackOnly()).load(f"{host}/clip.mp4"))


def test_too_many_videos_and_frames_are_refused(server, clip):
    url = data_url(clip.read_bytes())
    content = [{"type": "text", "text": "x"}] + [{"type": "video_url", "video_url": {"url": url}}] * 3
    assert_error(post(server, {"messages": [{"role": "user", "content": content}]}), 400)
    assert_error(post(server, video_request(url, num_frames=0)), 400)


# ----------------------------------------------------------------------------- batch and page


def test_batch_video_column_equals_pipeline_and_resumes(vpipe, clip, reference, tmp_path):
    from llava_ov.frontends.batch.local import run_batch

    table = tmp_path / "rows.jsonl"
    rows = [{"id": "pan", "video": str(clip), "prompt": PROMPT}, {"id": "bad", "video": "missing.mp4", "prompt": "x"}]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    summary = run_batch(vpipe, table, out, config=CONFIG, progress=False)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["pan"]["answer"] == reference.text and records["pan"]["video"] == str(clip)
    assert records["bad"]["error"] and (summary.succeeded, summary.failed) == (1, 1)
    again = run_batch(vpipe, table, out, config=CONFIG, progress=False)
    assert again.skipped == 2 and len(out.read_text().splitlines()) == 2


def test_page_answers_about_a_video(vpipe, clip, reference):
    from llava_ov.frontends.ui import ChatPage

    page = ChatPage(vpipe, CONFIG)
    state = page.new_state()
    page.add_message({"text": PROMPT, "files": [str(clip)]}, state)
    *_, (display, stats) = page.respond(state, 8, 0.0, 1.0)
    assert display[-3:] == [{"role": "user", "content": {"path": str(clip)}}, {"role": "user", "content": PROMPT},
                            {"role": "assistant", "content": reference.text}]  # fmt: skip
    assert "video (4 frames)" in stats


def test_bench_times_frame_counts(video_export, clip, tmp_path):
    from llava_ov.tools.bench_video import VideoBenchOptions, format_video_report, plot_video, run_video_bench

    opts = VideoBenchOptions(video_export, clip, (2, 4), max_new_tokens=4, runs=2, warmup=0,
                             load=LoadSettings(properties=F32, cache_dir=None))  # fmt: skip
    report = run_video_bench(opts, log=lambda _: None)
    assert [report["levels"][n]["ours"]["video_tokens"] for n in ("2", "4")] == [288, 576]
    assert all(report["levels"][n]["ours"]["ttft_s"]["n"] == 2 for n in ("2", "4"))
    table = format_video_report(report)
    assert table.count("| ours |") == 2 and report["machine"]["cpu"] in table
    plot_video(report, tmp_path / "frames.png")
    assert (tmp_path / "frames.png").stat().st_size > 1000


def test_sampling_by_frames_per_second(vpipe, clip, photos):
    """The 1 s, 12-frame clip at 2 frames a second: 2 frames; a list of frames has no rate to sample by."""
    result = vpipe.generate(PROMPT, config=GenerationConfig(max_new_tokens=2, video_fps=2), videos=[clip])
    assert result.video_frames == 2
    frames = [Image.open(photos["coffee"]).convert("RGB")] * 3
    with pytest.raises(LlavaOvError, match="frame rate"):
        vpipe.generate(PROMPT, config=GenerationConfig(max_new_tokens=2, video_fps=2), videos=[frames])
    with pytest.raises(LlavaOvError, match="exclude each other"):
        vpipe.generate(PROMPT, config=GenerationConfig(num_frames=2, video_fps=2), videos=[clip])


def test_a_chat_keeps_its_video_sampling_and_reuses_the_cache(vpipe, photos):
    """Frames fitted to the context on the first turn stay for the conversation (a longer history would
    otherwise mean fewer frames each turn, another sampling, and no prefix reuse)."""
    from llava_ov.runtime.chat import ChatSession

    vpipe.clear_caches()
    many = [Image.open(photos["rocket"]).convert("RGB").rotate(i) for i in range(40)]
    chat = ChatSession(vpipe)
    config = GenerationConfig(max_new_tokens=64, ignore_eos=True)
    first = chat.ask("What happens?", config=config, videos=[many])
    second = chat.ask("And then?", config=config)
    assert first.video_frames == second.video_frames == chat.frames_per_video > 1
    assert second.cached_tokens >= 0.95 * first.prompt_tokens  # the first turn, video included, in full blocks
    chat.reset()
    assert chat.frames_per_video is None


def test_server_default_frames_do_not_clash_with_a_requests_fps():
    from llava_ov.frontends.server.mapping import generation_config
    from llava_ov.frontends.server.schemas import ChatCompletionRequest

    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], video_fps=1.0)
    config = generation_config(req, ServerSettings(num_frames=8))
    assert (config.num_frames, config.video_fps) == (None, 1.0)


def test_default_frames_fit_the_callers_prompt_limit(vpipe, photos):
    many = [Image.open(photos["coffee"]).convert("RGB").rotate(i) for i in range(40)]
    prompt = vpipe.prepare([Message("user", "x", videos=[many])], GenerationConfig(max_new_tokens=16), max_tokens=2000)
    assert len(prompt.token_ids) <= 2000 and prompt.video_frames == (2000 - (len(prompt.token_ids) - prompt.video_tokens) - 16) // 144


def test_server_takes_transformers_video_part_with_one_url(server, clip, reference):
    content = [{"type": "text", "text": PROMPT}, {"type": "video", "video": data_url(clip.read_bytes())}]
    body = post(server, {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "num_frames": FRAMES})
    assert body.json()["choices"][0]["message"]["content"] == reference.text


def test_page_stop_while_the_video_is_read_withdraws_the_message_quietly(vpipe, photos, monkeypatch):
    """Stop pressed while the video's frames are encoded: the message is withdrawn as a Stop before the
    answer begins is, with no error shown."""
    import threading

    from llava_ov.frontends.ui import ChatPage

    vpipe.clear_caches()
    frames = [Image.open(photos["rocket"]).convert("RGB").rotate(i / 2) for i in range(24)]
    page = ChatPage(vpipe, GenerationConfig(max_new_tokens=4, num_frames=24))
    state = page.new_state()
    encode = vpipe.model.encode_frames

    def slow(px):  # Stop arrives during the first batch of frames
        threading.Timer(0.05, lambda: page.stop(state)).start()
        time.sleep(0.3)
        return encode(px)

    monkeypatch.setattr(vpipe.model, "encode_frames", slow)
    state.pending, state.pending_from = ("What happens?", [], [frames]), len(state.display)
    state.display.append({"role": "user", "content": "What happens?"})
    updates = list(page.respond(state, 4, 0.0, 1.0))  # no gr.Error raised
    assert updates and updates[-1][0] == [] and state.chat.messages == []
