"""OpenAI-compatible server: real uvicorn servers on loopback, the official `openai` client, the reference Pipeline.

Answers must equal `Pipeline.generate` with the same settings; every error is an
OpenAI error body with the right status and leaves the server healthy; client
disconnects cancel generation; the OpenAPI schema is fuzzed with schemathesis.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import http.server
import json
import re
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from conftest import F32, serve_http
from llava_ov.common.layout import EXAMPLES_DIR
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from llava_ov.runtime.settings import LoadSettings
from llava_ov.frontends.server import ServerSettings, create_app
from llava_ov.frontends.server.mapping import FINISH_REASONS

LIMIT = 2 * 1024 * 1024  # body limit of the main test server
CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": [{"type": "text", "text": "And another one?"}]},
]


# ----------------------------------------------------------------------------- servers


@contextmanager
def running(app):
    """Serve `app` with uvicorn on a free loopback port in a background thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    from llava_ov.frontends.server.http import uvicorn_config

    config = uvicorn_config(app, app.state.server.settings, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def openai_client(export: Path, pipe: Pipeline | None = None):
    """The official openai client on a server of `export` (f32 pins; `pipe`: serve that loaded pipeline)."""
    settings = ServerSettings(model=str(export), load=LoadSettings(properties=F32, cache_dir=None))
    with running(create_app(settings, pipeline_factory=(lambda: pipe) if pipe is not None else None)) as base:
        wait_ready(base)
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def wait_ready(base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while HTTP.get(f"{base}/health").status_code != 200:
        assert time.monotonic() < deadline, "model did not load"
        time.sleep(0.05)


class Proxy:
    """Test hook around a pipeline: records what the server submitted and the results.

    With `delay`, answers ignore EOS (slow_app also slows the engine's forwards by `delay`)."""

    def __init__(self, pipe: Pipeline, delay: float = 0.0):
        self.pipe, self.delay = pipe, delay
        self.started = threading.Event()
        self.streams = []  # the pipeline's ChunkStreams, in submission order

    def __getattr__(self, name):  # the rest of the Pipeline API (token_bytes, json_constraint, occupancy, ...)
        return getattr(self.pipe, name)

    @property
    def calls(self) -> int:
        return len(self.streams)

    @property
    def results(self) -> list:
        return [s.result for s in self.streams if s.result is not None]

    def submit_n(self, messages, n=1, config=None, cancel=None, progress=None, max_prompt_tokens=None):
        self.started.set()
        if self.delay:  # long answers that only a cancel can stop early
            config = dataclasses.replace(config, ignore_eos=True)
        streams = self.pipe.submit_n(messages, n, config=config, cancel=cancel, progress=progress,
                                     max_prompt_tokens=max_prompt_tokens)  # fmt: skip
        self.streams.extend(streams)
        return streams


@pytest.fixture(scope="module")
def reference(exports) -> Pipeline:
    return Pipeline(exports["llava-next"], properties=F32, cache_dir=None)


@pytest.fixture(scope="module")
def server(exports):
    """The main server: loads the export itself (default factory) with the same F32 properties as the reference."""
    settings = ServerSettings(model=str(exports["llava-next"]), load=LoadSettings(properties=F32, cache_dir=None),
                              max_body_bytes=LIMIT)
    with running(create_app(settings)) as base:
        wait_ready(base)
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def jpeg_url(photos) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(photos["chelsea"]).read_bytes()).decode()


# Where the server's files live: none of these may appear in an error body.
SERVER_PATHS = (str(Path(__file__).resolve().parents[1]), tempfile.gettempdir(), sys.prefix)
HTTP = httpx.Client(timeout=60)  # one client: a new one per call costs ~0.1 s here


def post(base: str, body, **kw) -> httpx.Response:
    return HTTP.post(f"{base}/v1/chat/completions", json=body, **kw)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """An OpenAI error body with the given status, no stack trace and no server path."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert "Traceback" not in response.text and not any(path in response.text for path in SERVER_PATHS)
    if code is not None:
        assert error["code"] == code
    return error


def assert_healthy(base: str) -> None:
    assert HTTP.get(f"{base}/health").status_code == 200
    answer = post(base, {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["role"] == "assistant"


def metric(base: str, name: str) -> float:
    """A sample's value from /metrics (0 when absent)."""
    text = HTTP.get(f"{base}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def messages_for(conversation, images=()) -> list[Message]:
    """The runtime messages an OpenAI conversation stands for (images on the last user turn)."""
    out = []
    for m in conversation:
        content = m["content"]
        text = content if isinstance(content, str) else "\n".join(p["text"] for p in content if p["type"] == "text")
        out.append(Message(m["role"], text))
    out[-1].images = list(images)
    return out


# ----------------------------------------------------------------------------- answers


def test_health_and_models(server, client):
    assert HTTP.get(f"{server}/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == ["ov-llava-next"] and models[0].object == "model"


def test_non_streaming_answer_equals_pipeline(client, reference):
    answer = client.chat.completions.create(model="any", messages=CONVERSATION, max_tokens=12, temperature=0)
    expected = reference.generate(messages_for(CONVERSATION), config=GenerationConfig(max_new_tokens=12))
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == FINISH_REASONS[expected.finish_reason]
    assert answer.usage.prompt_tokens == expected.prompt_tokens
    assert answer.usage.completion_tokens == len(expected.token_ids)
    assert answer.usage.total_tokens == expected.prompt_tokens + len(expected.token_ids)
    assert answer.object == "chat.completion" and answer.model == "ov-llava-next"


def test_streaming_answer_with_image_equals_pipeline(client, reference, photos, jpeg_url):
    conversation = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                                 {"type": "image_url", "image_url": {"url": jpeg_url}}]}]  # fmt: skip
    stream = client.chat.completions.create(
        model="any", messages=conversation, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    messages = messages_for(conversation, [photos["chelsea"]])
    expected = reference.generate(messages, config=GenerationConfig(max_new_tokens=16))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text and expected.image_tokens > 0
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [FINISH_REASONS[expected.finish_reason]]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == expected.prompt_tokens
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("extension", [{"max_image_tokens": 1200}, {"visual_token_pruning": 0.75}])
def test_image_token_budget_and_pruning_equal_pipeline_and_show_in_usage(server, reference, photos, jpeg_url, extension):
    conversation = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                                 {"type": "image_url", "image_url": {"url": jpeg_url}}]}]  # fmt: skip
    answer = post(server, {"messages": conversation, "max_tokens": 12, **extension})
    assert answer.status_code == 200, answer.text
    config = GenerationConfig(max_new_tokens=12, **extension)
    expected = reference.generate(messages_for(conversation, [photos["chelsea"]]), config=config)
    usage = answer.json()["usage"]
    assert answer.json()["choices"][0]["message"]["content"] == expected.text
    assert usage["prompt_tokens"] == expected.prompt_tokens
    assert usage["image_tokens"] == expected.image_tokens < usage["image_tokens_total"] == expected.image_tokens_total


def test_stream_ends_with_done_marker(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with HTTP.stream("POST", f"{server}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_sampling_and_stop_settings_equal_pipeline(client, reference):
    prompt = [{"role": "user", "content": "Tell me a story."}]
    sampled = GenerationConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=1234)
    expected = reference.generate(messages_for(prompt), config=sampled)
    answer = client.chat.completions.create(model="m", messages=prompt, max_completion_tokens=10, temperature=0.8,
                                            top_p=0.9, seed=1234)  # fmt: skip
    assert answer.choices[0].message.content == expected.text
    greedy = reference.generate(messages_for(prompt), config=GenerationConfig(max_new_tokens=10))
    stop = greedy.text.split()[2]  # a word from the middle of the greedy answer
    expected = reference.generate(messages_for(prompt), config=GenerationConfig(max_new_tokens=10, stop=[stop]))
    answer = client.chat.completions.create(model="m", messages=prompt, max_tokens=10, temperature=0, stop=[stop, "@@"])
    assert expected.finish_reason == "stop" and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == expected.text and stop not in expected.text


def test_max_tokens_is_capped(exports, reference):
    settings = ServerSettings(model=str(exports["llava-next"]), max_tokens=3)
    with running(create_app(settings, lambda: Proxy(reference))) as base:
        wait_ready(base)
        body = {"messages": [{"role": "user", "content": "Count to a hundred."}], "max_tokens": 500}
        usage = post(base, body).json()["usage"]
    assert usage["completion_tokens"] <= 3


def test_max_prompt_tokens_refuses_before_the_vision_encoder(exports, reference, jpeg_url, monkeypatch):
    settings = ServerSettings(model=str(exports["llava-next"]), max_prompt_tokens=1000)
    reference.clear_caches()
    monkeypatch.setattr(reference.model, "encode_image_tiles", lambda px: pytest.fail("encoded a refused prompt"))
    with running(create_app(settings, lambda: Proxy(reference))) as base:
        wait_ready(base)
        error = assert_error(post(base, image_request(jpeg_url)), 400, "context_length_exceeded")
        assert "at most 1000" in error["message"]
        text = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert post(base, text).status_code == 200  # short prompts still run


def test_metrics_exposition_counts_tokens_and_requests(server, client):
    before = {k: metric(server, k) for k in ("llava_ov_prompt_tokens_total", "llava_ov_completion_tokens_total")}
    ok = metric(server, 'llava_ov_http_requests_total{path="/v1/chat/completions",status="200"}')
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
    text = HTTP.get(f"{server}/metrics").text
    assert metric(server, "llava_ov_prompt_tokens_total") == (
        before["llava_ov_prompt_tokens_total"] + answer.usage.prompt_tokens
    )
    assert metric(server, "llava_ov_completion_tokens_total") == (
        before["llava_ov_completion_tokens_total"] + answer.usage.completion_tokens
    )
    assert metric(server, 'llava_ov_http_requests_total{path="/v1/chat/completions",status="200"}') == ok + 1
    for name in ("llava_ov_time_to_first_token_seconds", "llava_ov_time_per_output_token_seconds"):
        assert f"# TYPE {name} histogram" in text
        buckets = [float(v) for v in re.findall(rf'^{name}_bucket{{le="[^"]+"}} (\S+)$', text, re.M)]
        assert buckets == sorted(buckets) and buckets[-1] == metric(server, f"{name}_count") > 0
    assert "# TYPE llava_ov_queue_depth gauge" in text and metric(server, "llava_ov_model_ready") == 1


# ----------------------------------------------------------------------------- errors


HELLO = [{"role": "user", "content": "Hello"}]
BAD_REQUESTS = {
    "no messages": {"model": "m"},
    "empty messages": {"messages": []},
    "unknown role": {"messages": [{"role": "robot", "content": "Hi"}]},
    "bad part type": {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
    "negative max_tokens": {"messages": HELLO, "max_tokens": -1},
    "temperature too high": {"messages": HELLO, "temperature": 5},
    "n=17": {"messages": HELLO, "n": 17},
    "n=0": {"messages": HELLO, "n": 0},
    "top_logprobs without logprobs": {"messages": HELLO, "top_logprobs": 2},
    "top_logprobs 21": {"messages": HELLO, "logprobs": True, "top_logprobs": 21},
    "unknown response_format": {"messages": HELLO, "response_format": {"type": "xml"}},
    "json_schema without name": {"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {}}},
    "too many messages": {"messages": HELLO * 1025},
    "pruning 1.0": {"messages": HELLO, "visual_token_pruning": 1.0},
    "max_image_tokens 0": {"messages": HELLO, "max_image_tokens": 0},
    "string body": "just a string",
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_400(server, case):
    error = assert_error(post(server, BAD_REQUESTS[case]), 400)
    assert error["type"] == "invalid_request_error"
    if case.startswith("n="):
        assert "n" in error["param"]


@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogate_gets_400_without_a_traceback(server, stream, caplog):
    body = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "stream": %s}' % (b"true" if stream else b"false")
    response = HTTP.post(f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert "not valid Unicode" in assert_error(response, 400)["message"]
    assert "Traceback" not in caplog.text and "generation failed" not in caplog.text
    assert_healthy(server)


def test_invalid_json_gets_400(server):
    headers = {"content-type": "application/json"}
    response = HTTP.post(f"{server}/v1/chat/completions", content=b'{"messages": [', headers=headers)
    assert "not valid JSON" in assert_error(response, 400)["message"]
    response = HTTP.post(f"{server}/v1/chat/completions", content=b"\xef\xbf\x1b", headers=headers)
    assert "not valid JSON" in assert_error(response, 400)["message"]
    assert_healthy(server)


def test_large_bodies_are_parsed_in_a_child_process_and_bounded_in_values(server):
    """json.loads holds the GIL: a 28 MB body of 800,000 messages froze the event loop even from a
    thread. Bodies over 1 MiB are parsed in a child process, which refuses more JSON values than a
    request can need, so the server never builds (or unpickles) such a body."""
    import asyncio

    from llava_ov.frontends.server.app import BodyParser
    from llava_ov.frontends.server.jsonparse import OFFLOAD_BYTES, TooManyValues, parse_limited

    parser = BodyParser()
    small = json.dumps({"messages": HELLO}).encode()
    assert asyncio.run(parser.parse(small)) == {"messages": HELLO} and parser._pool is None  # inline
    image = json.dumps({"messages": [{"role": "user", "content": "x" * OFFLOAD_BYTES}]}).encode()
    assert asyncio.run(parser.parse(image))["messages"][0]["content"] == "x" * OFFLOAD_BYTES
    assert parser._pool is not None  # the large one went to the child process
    parser.close()
    with pytest.raises(TooManyValues, match="more than 10"):
        parse_limited(json.dumps([1] * 11).encode(), max_values=10)
    big = {"messages": [{"role": "user", "content": "hi"}] * 50_000}
    error = assert_error(post(server, big), 400, "request_too_complex")
    assert "100,000 JSON values" in error["message"]
    assert_healthy(server)


def image_request(url: str, stream: bool = False) -> dict:
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "stream": stream}


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64," + base64.b64encode(b"certainly not an image").decode(),
        "data:image/png;base64,@@not base64@@",
        "data:image/png,rawbytes",
        "data:image/png;base64,",
    ],
    ids=["undecodable", "bad-base64", "not-base64", "empty"],
)
def test_undecodable_image_gets_400(server, url):
    error = assert_error(post(server, image_request(url)), 400, "invalid_image")
    assert error["param"] == "messages[0].content[1].image_url"
    assert_healthy(server)


@pytest.mark.parametrize("stream", [False, True])
def test_too_long_prompt_gets_400(server, stream):
    body = {"messages": [{"role": "user", "content": "word " * 40_000}], "stream": stream}
    error = assert_error(post(server, body), 400, "context_length_exceeded")
    assert "context" in error["message"]
    assert_healthy(server)


def test_body_over_limit_gets_413(server):
    big = {"messages": [{"role": "user", "content": "x" * (LIMIT + 10)}]}
    assert_error(post(server, big), 413, "body_too_large")
    chunks = (b"x" * 65536 for _ in range(LIMIT // 65536 + 2))  # chunked upload: no Content-Length to check
    response = HTTP.post(f"{server}/v1/chat/completions", content=chunks, headers={"content-type": "application/json"})
    assert_error(response, 413, "body_too_large")
    assert_healthy(server)


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/health", "http://localhost:{port}/metrics",
                                 "http://[::1]:{port}/", "http://169.254.169.254/latest/meta-data/"])  # fmt: skip
def test_private_image_urls_are_refused(server, url):
    url = url.format(port=server.rsplit(":", 1)[1])
    error = assert_error(post(server, image_request(url)), 400, "invalid_image")
    assert "private" in error["message"]
    assert_healthy(server)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "{photo}", "file://{photo}"])
def test_local_files_are_refused(server, photos, url):
    url = url.format(photo=photos["chelsea"])
    error = assert_error(post(server, image_request(url)), 400, "invalid_image")
    assert "local files are not allowed" in error["message"]
    assert_healthy(server)


def test_docs_routes(server):
    assert HTTP.get(f"{server}/openapi.json").status_code == 200 and HTTP.get(f"{server}/docs").status_code == 200
    assert_error(HTTP.get(f"{server}/redoc"), 404)


def test_unknown_path_and_method_get_openai_errors(server):
    assert_error(HTTP.get(f"{server}/v1/nothing"), 404)
    assert_error(HTTP.get(f"{server}/v1/chat/completions"), 405)


def test_api_key_and_allowed_local_sources(exports, reference, photos, jpeg_url, tmp_path):
    """A second app with a key (constant-time check) that also allows local files and private URLs."""
    settings = ServerSettings(model=str(exports["llava-next"]), api_key="s3cret", allow_local_files=True,
                              allow_private_urls=True)  # fmt: skip
    with running(create_app(settings, lambda: Proxy(reference))) as base, photo_server(photos["chelsea"]) as photo_url:
        assert HTTP.get(f"{base}/health").status_code in (200, 503)  # no key needed
        wait_ready(base)
        assert_error(post(base, image_request(jpeg_url)), 401, "invalid_api_key")
        assert_error(post(base, image_request(jpeg_url), headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(HTTP.get(f"{base}/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
        keyed = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="s3cre", max_retries=0).models.list()
        answers = {
            src: keyed.chat.completions.create(model="m", **image_request(src)).choices[0].message.content
            for src in (jpeg_url, photo_url, str(photos["chelsea"]), Path(photos["chelsea"]).as_uri())
        }
    assert len(set(answers.values())) == 1  # the same image from every source: the same answer


@contextmanager
def photo_server(path: Path):
    """A plain HTTP server on loopback serving one photo at /photo."""
    data = Path(path).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    with serve_http(Handler) as base:
        yield base + "/photo"


def test_health_is_503_while_loading(exports, reference):
    release = threading.Event()

    def slow_factory():
        assert release.wait(30)
        return Proxy(reference)

    with running(create_app(ServerSettings(model=str(exports["llava-next"])), slow_factory)) as base:
        response = HTTP.get(f"{base}/health")
        assert response.status_code == 503 and response.json() == {"status": "loading"}
        assert_error(post(base, {"messages": HELLO}), 503, "model_loading")
        assert metric(base, "llava_ov_model_ready") == 0
        release.set()
        wait_ready(base)
        assert_healthy(base)


def test_failed_load_is_reported_without_paths():
    failed = threading.Event()
    settings = ServerSettings(model="/srv/secret-models/missing")  # the default factory: ModelNotFoundError
    with running(create_app(settings, on_load_failure=failed.set)) as base:
        assert failed.wait(30)
        response = HTTP.get(f"{base}/health")
        assert response.status_code == 503 and response.json() == {"status": "failed"}
        response = post(base, {"messages": HELLO})
        assert_error(response, 503, "model_failed")
        assert "secret-models" not in response.text


# ----------------------------------------------------------------------------- queue and cancellation


@pytest.fixture(scope="module")
def single(exports) -> Pipeline:
    """A pipeline whose engine computes one sequence at a time (the rest wait in its queue)."""
    return Pipeline(exports["llava-next"], properties=F32, cache_dir=None, max_running=1)


@pytest.fixture
def gated(exports, single):
    """An app with a one-place queue over a one-sequence engine whose forwards wait for `gate`."""
    proxy = Proxy(single)
    proxy.gate, proxy.entered = threading.Event(), threading.Event()
    fast_forward = single.engine.lm.forward

    def gated_forward(batch, **kwargs):  # the engine itself is busy: nothing in the server holds the requests
        proxy.entered.set()
        assert proxy.gate.wait(30)
        return fast_forward(batch, **kwargs)

    single.engine.lm.forward = gated_forward
    try:
        with running(create_app(ServerSettings(model=str(exports["llava-next"]), max_queue=1), lambda: proxy)) as base:
            wait_ready(base)
            yield base, proxy
    finally:
        proxy.gate.set()
        del single.engine.lm.forward  # back to the class's method


def test_requests_run_concurrently_in_the_engine(exports, reference):
    """Two long answers overlap in time (they are batched), and each equals the pipeline's answer alone."""
    with slow_app(exports, reference, delay=0.005) as (base, proxy):
        body = {"messages": HELLO, "max_tokens": 40, "stream": True}
        stamps: dict[int, list[float]] = {0: [], 1: []}

        def read(i):
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        stamps[i].append(time.monotonic())

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(read, (0, 1)))
    assert min(len(s) for s in stamps.values()) > 10
    first_end = min(s[-1] for s in stamps.values())
    last_start = max(s[0] for s in stamps.values())
    assert last_start < first_end  # both streams produced tokens at the same time
    answers = [r.token_ids for r in proxy.results]
    assert len(answers) == 2 and answers[0] == answers[1]


def test_full_queue_gets_429(gated, single):
    """Requests beyond the engine's max_running wait in the engine's own queue; past max_queue: 429."""
    base, proxy = gated
    body = {"messages": HELLO, "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running_one = pool.submit(post, base, body)
        assert proxy.entered.wait(30)  # the engine computes it (its forward waits for the gate)
        queued = pool.submit(post, base, body)
        wait_for(lambda: single.occupancy() == (1, 1))  # submitted to the engine, waiting there
        assert metric(base, "llava_ov_queue_depth") == 1 and metric(base, "llava_ov_requests_running") == 1
        error = assert_error(post(base, body), 429, "queue_full")
        assert error["type"] == "rate_limit_error"
        proxy.gate.set()
        assert running_one.result().status_code == 200 and queued.result().status_code == 200
    assert metric(base, 'llava_ov_http_errors_total{status="429"}') == 1
    assert proxy.calls == 2  # the refused request never reached the pipeline
    assert_healthy(base)


def test_queued_request_of_a_departed_client_is_dropped(gated):
    base, proxy = gated
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, base, {"messages": HELLO, "max_tokens": 2})
        assert proxy.entered.wait(30)
        with pytest.raises(httpx.ReadTimeout):  # this client gives up while its request waits in the queue
            httpx.post(f"{base}/v1/chat/completions", json={"messages": HELLO}, timeout=0.5)
        proxy.gate.set()
        assert first.result().status_code == 200
    wait_for(lambda: metric(base, "llava_ov_dropped_requests_total") == 1)
    assert proxy.streams[0].started and not any(s.started for s in proxy.streams[1:])  # it never ran in the engine
    assert metric(base, 'llava_ov_generations_total{finish_reason="cancelled"}') == 0
    assert_healthy(base)


def test_stateful_backend_serves_through_the_same_worker(exports, reference):
    """On the stateful path (one sequence at a time, its own queue) concurrent requests all get the
    paged engine's answer."""
    stateful = Pipeline(exports["llava-next"], properties=F32, cache_dir=None, kv_cache="stateful")
    expected = reference.generate(messages_for(HELLO), config=GenerationConfig(max_new_tokens=8)).text
    try:
        with running(create_app(ServerSettings(model=str(exports["llava-next"])), lambda: stateful)) as base:
            wait_ready(base)
            body = {"messages": HELLO, "max_tokens": 8}
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(lambda _: post(base, body), range(3)))
            assert [a.status_code for a in answers] == [200] * 3
            assert [a.json()["choices"][0]["message"]["content"] for a in answers] == [expected] * 3
            assert_healthy(base)
    finally:
        stateful.close()


@contextmanager
def slow_app(exports, reference, delay: float = 0.02, **settings):
    """An app whose generations take ~`delay` s per token and ignore EOS: only a cancel ends them early."""
    proxy = Proxy(reference, delay=delay)
    fast_forward = reference.engine.lm.forward

    def slow_forward(batch, **kwargs):  # the model is slow, not the client: the engine itself paces the tokens
        time.sleep(proxy.delay)
        return fast_forward(batch, **kwargs)

    reference.engine.lm.forward = slow_forward
    try:
        with running(create_app(ServerSettings(model=str(exports["llava-next"]), **settings), lambda: proxy)) as base:
            wait_ready(base)
            yield base, proxy
    finally:
        del reference.engine.lm.forward  # back to the class's method


@pytest.fixture
def slow(exports, reference):
    with slow_app(exports, reference) as (base, proxy):
        yield base, proxy


MANY = 1000  # tokens that would take ~20 s


def test_disconnecting_streaming_client_cancels_generation(slow):
    base, proxy = slow
    body = {"messages": HELLO, "max_tokens": MANY, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(4)]  # a few chunks arrive, then the client leaves
    wait_for(lambda: len(proxy.results) == 1)
    assert proxy.results[0].finish_reason == "cancelled" and len(proxy.results[0].token_ids) < MANY
    assert metric(base, 'llava_ov_generations_total{finish_reason="cancelled"}') == 1
    assert_healthy(base)


def test_disconnecting_client_cancels_non_streaming_generation(slow):
    base, proxy = slow
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", json={"messages": HELLO, "max_tokens": MANY}, timeout=0.5)
    wait_for(lambda: len(proxy.results) == 1)
    assert proxy.results[0].finish_reason == "cancelled" and len(proxy.results[0].token_ids) < MANY
    assert_healthy(base)


def test_request_timeout_cuts_the_answer(exports, reference):
    with slow_app(exports, reference, request_timeout_s=2) as (base, proxy):
        answer = post(base, {"messages": HELLO, "max_tokens": MANY}).json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert 0 < answer["usage"]["completion_tokens"] < MANY
    assert proxy.results[0].finish_reason == "cancelled"


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- fuzzing and tools


@pytest.fixture(scope="module")
def fuzz_base(exports, reference):
    """Fuzz target: the real app, with answers capped at 2 tokens so examples stay fast."""
    app = create_app(ServerSettings(model=str(exports["llava-next"]), max_tokens=2), lambda: Proxy(reference))
    with running(app) as base:
        wait_ready(base)
        yield base


def test_openapi_fuzzing_finds_no_server_errors(fuzz_base):
    """Schema-valid and schema-violating requests: no 5xx, violations get 400, responses match the schema."""
    import hypothesis
    import schemathesis
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{fuzz_base}/openapi.json")
    statuses = []
    for mode, examples in ((GenerationMode.POSITIVE, 40), (GenerationMode.NEGATIVE, 30)):
        for operation in schema.get_all_operations():
            op = operation.ok()
            if op.method != "post" and mode == GenerationMode.NEGATIVE:
                continue  # GETs without parameters have no invalid input

            @hypothesis.settings(max_examples=examples if op.method == "post" else 3, deadline=None, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=fuzz_base, timeout=30)
                statuses.append(response.status_code)
                # semantic checks (an unreachable image URL...) may refuse schema-valid data with 400
                case.validate_response(response, excluded_checks=[positive_data_acceptance])

            check()
    assert 200 in statuses and 400 in statuses and max(statuses) < 500
    assert_healthy(fuzz_base)


def test_serve_command_options(tmp_path):
    from llava_ov.cli import build_parser
    from llava_ov.frontends.server.cli import settings_from_args

    (tmp_path / "x").mkdir()
    args = build_parser().parse_args(["serve", str(tmp_path / "x"), "--api-key", "k", "--max-queue", "3", "--f32",
                                      "--allow-local-files", "--max-body-mb", "1"])  # fmt: skip
    settings = settings_from_args(args)
    assert (settings.api_key, settings.max_queue, settings.allow_local_files) == ("k", 3, True)
    assert not settings.allow_private_urls
    assert settings.load.properties == F32 and settings.max_body_bytes == 1024 * 1024 and settings.served_name == "x"


def test_load_test_script_smoke(server):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    report = module.run(server, clients=3, requests=6, max_tokens=2)
    assert report["statuses"] == {200: 6} and report["requests"] == 6
    assert 0 < report["latency_s"]["p50"] <= report["latency_s"]["p99"]
    # the mixed load: text/image, JSON/stream, clients that leave after the first chunk; /health probed
    mixed = module.run(server, clients=4, requests=8, max_tokens=4, image=[str(EXAMPLES_DIR / "cat.jpg")], mix=True)
    assert mixed["statuses"] == {200: 6, "disconnected": 2}
    assert mixed["health"]["probes"] >= 1 and mixed["health"]["failed"] == 0


def test_load_test_hostile_mix_is_refused_and_nothing_else_is_lost(exports, reference):
    """One of each attack beside a small mixed load, on a server with short deadlines: each gets the
    answer it should, and the ordinary requests all succeed."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test_hostile", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test_hostile"] = module
    spec.loader.exec_module(module)
    settings = ServerSettings(model=str(exports["llava-next"]), header_timeout_s=0.5, body_timeout_s=1.0)
    with running(create_app(settings, lambda: Proxy(reference))) as base:
        wait_ready(base)
        report = module.run(base, clients=4, requests=8, max_tokens=4, image=[str(EXAMPLES_DIR / "cat.jpg")],
                            mix=True, hostile=len(module.HOSTILE))  # fmt: skip
    assert report["statuses"] == {200: 6, "disconnected": 2}
    got = {kind: set(v["statuses"]) for kind, v in report["hostile"].items()}
    assert got == {"slow-headers": {"closed"}, "huge-header": {"431"}, "slow-body": {"408"},
                   "declared-bomb": {"400"}, "heavy-image": {"200"}, "big-json": {"400"}, "surrogate": {"400"},
                   "deep-json": {"400"}, "deep-schema": {"400"}, "deep-schema-80": {"400"}, "many-images": {"400"},
                   "too-many-images": {"400"}}, got
    assert report["health"]["failed"] == 0


def test_slow_and_oversized_clients_are_cut_off(exports, reference):
    """Headers trickled past the deadline, oversized headers and idle keep-alive connections are closed
    by the server itself, while /health keeps answering."""
    settings = ServerSettings(model=str(exports["llava-next"]), header_timeout_s=0.5, max_header_bytes=8192,
                              keep_alive_s=0.5, body_timeout_s=1.0)  # fmt: skip
    with running(create_app(settings, lambda: Proxy(reference))) as base:
        wait_ready(base)
        port = int(base.rsplit(":", 1)[1])

        def connect() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            return sock

        slow = connect()
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        started = time.monotonic()
        assert HTTP.get(f"{base}/health").status_code == 200  # others are served meanwhile
        assert slow.recv(100) == b"" and time.monotonic() - started < 3  # closed at the deadline
        big = connect()
        big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        reply = big.recv(200)
        assert reply.startswith(b"HTTP/1.1 431")  # refused before it is parsed
        idle = connect()
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(1000).startswith(b"HTTP/1.1 200")
        time.sleep(1.0)
        assert idle.recv(100) == b""  # the idle keep-alive connection was closed
        trickle = connect()  # whole headers, then a body that never arrives
        trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"messages\": [")  # fmt: skip
        started = time.monotonic()
        reply = trickle.recv(1000)
        assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout" in reply, reply
        assert time.monotonic() - started < 4
        for sock in (slow, big, idle, trickle):
            sock.close()
        assert_healthy(base)


# ----------------------------------------------------------------------------- structured output and logprobs

ITEMS = {
    "type": "object",
    "properties": {"kind": {"enum": ["cat", "dog"]}, "count": {"type": "integer", "minimum": 1, "maximum": 9},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3}},
    "required": ["kind", "count", "tags"], "additionalProperties": False,
}  # fmt: skip
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "items", "schema": ITEMS, "strict": True}}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_validates_and_equals_pipeline(client, reference, stream):
    import jsonschema

    prompt = [{"role": "user", "content": "List what you see."}]
    expected = reference.generate(messages_for(prompt), config=GenerationConfig(max_new_tokens=100, json_schema=ITEMS))
    answer = client.chat.completions.create(model="m", messages=prompt, max_tokens=100, response_format=SCHEMA_FORMAT,
                                            stream=stream)  # fmt: skip
    if stream:
        chunks = [c for c in answer if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    else:
        text, finish = answer.choices[0].message.content, [answer.choices[0].finish_reason]
    assert text == expected.text and finish == ["stop"]
    jsonschema.validate(json.loads(text), ITEMS)


def test_response_format_json_object_and_cut_json(client, reference):
    from llava_ov.runtime.constrained import JSON_OBJECT

    prompt = [{"role": "user", "content": "Answer in JSON."}]
    # any object: keys and strings are unbounded, so a random model may run on; take a seed whose answer ends
    seed = next(seed for seed in range(20) if reference.generate(messages_for(prompt), config=GenerationConfig(
        max_new_tokens=200, json_schema=JSON_OBJECT, temperature=0.7, seed=seed)).finish_reason == "eos")  # fmt: skip
    answer = client.chat.completions.create(model="m", messages=prompt, max_tokens=200, temperature=0.7, seed=seed,
                                            response_format={"type": "json_object"})  # fmt: skip
    assert answer.choices[0].finish_reason == "stop" and isinstance(json.loads(answer.choices[0].message.content), dict)
    cut = client.chat.completions.create(model="m", messages=prompt, max_tokens=3, response_format=SCHEMA_FORMAT)
    assert cut.choices[0].finish_reason == "length"  # raise max_tokens: the JSON was cut
    plain = client.chat.completions.create(model="m", messages=prompt, max_tokens=5, response_format={"type": "text"})
    assert plain.choices[0].message.content == client.chat.completions.create(
        model="m", messages=prompt, max_tokens=5).choices[0].message.content  # fmt: skip


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "string", "format": "no-such-format"}, "Unknown format"),
        ({"$ref": "#/definitions/missing"}, "does not exist"),
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable"),
        ({"enum": ["x" * 1000] * 70}, "the limit is"),
    ],
)
def test_unusable_schema_is_400_naming_the_problem(server, jpeg_url, schema, words):
    fetched_before = metric(server, "llava_ov_prompt_tokens_total")
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "JSON?"},
                                                      {"type": "image_url", "image_url": {"url": jpeg_url}}]}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}  # fmt: skip
    error = assert_error(post(server, body), 400, "invalid_json_schema")
    assert words in error["message"] and error["param"] == "response_format"
    assert metric(server, "llava_ov_prompt_tokens_total") == fetched_before  # nothing ran
    assert_healthy(server)


def test_logprobs_as_openai_returns_them(client, reference):
    import math

    prompt = [{"role": "user", "content": "Name three animals."}]
    config = GenerationConfig(max_new_tokens=8, logprobs=4)
    expected = reference.generate(messages_for(prompt), config=config)
    answer = client.chat.completions.create(model="m", messages=prompt, max_tokens=8, logprobs=True, top_logprobs=4)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == len(expected.token_ids)
    for entry, ours in zip(content, expected.logprobs):
        assert entry.logprob == pytest.approx(ours.logprob) and len(entry.top_logprobs) == 4
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the chosen token is the most likely
        assert bytes(entry.bytes) == reference.token_bytes(ours.token_id) and entry.token == bytes(entry.bytes).decode(
            "utf-8", errors="replace")  # fmt: skip
        assert all(a.logprob >= b.logprob for a, b in zip(entry.top_logprobs, entry.top_logprobs[1:]))
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6
    assert "".join(e.token for e in content).strip() == answer.choices[0].message.content.strip()

    stream = client.chat.completions.create(model="m", messages=prompt, max_tokens=8, logprobs=True, top_logprobs=4,
                                            stream=True)  # fmt: skip
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    off = client.chat.completions.create(model="m", messages=prompt, max_tokens=3)
    assert off.choices[0].logprobs is None


def test_a_submitted_job_counts_once_in_the_queue_depth():
    """A job leaves the preparing count in the thread that puts it in the backend's queue: between that
    put and its task resuming on the event loop it must not count twice (a spurious 429)."""
    from llava_ov.frontends.server.metrics import ServerMetrics
    from llava_ov.frontends.server.worker import GenerationWorker, Job
    from llava_ov.runtime.generate import GenerationConfig

    class Backlog:  # a pipeline whose one place is taken: what it gets waits
        max_concurrency = 1
        waiting: list = []

        def occupancy(self):
            return 1, len(self.waiting)

        def submit_n(self, messages, n=1, **kwargs):
            self.waiting.append(messages)
            return [object()]

    async def scenario() -> tuple[int, int]:
        worker = GenerationWorker(max_queue=1, metrics=ServerMetrics())
        worker.start(Backlog())
        worker._preparing = 1  # accepted by `submit`, as the event loop counts it
        job = Job(messages=[], config=GenerationConfig())
        before = worker.depth
        worker._prepare_and_submit(job)  # what the worker thread runs: the job is now in the backend's queue
        return before, worker.depth

    assert asyncio.run(scenario()) == (1, 1)
