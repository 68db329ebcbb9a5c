"""Hardening, third round (issue 29): deeply nested JSON anywhere the server or the CLI parses JSON is a 400 (or
a one-line error) naming the limit, in bounded time, and the server stays healthy."""

from __future__ import annotations

import json
import time

import pytest

from conftest import F32
from llava_ov.frontends.server.app import create_app
from llava_ov.frontends.server.jsonparse import MAX_JSON_DEPTH
from llava_ov.frontends.server.settings import ServerSettings
from llava_ov.runtime.constrained import MAX_SCHEMA_DEPTH
from llava_ov.runtime.settings import LoadSettings
from test_server import HTTP, assert_error, assert_healthy, running, wait_ready

HELLO = [{"role": "user", "content": "Hello"}]


def nested(depth: int, leaf: str = "0") -> str:
    return "[" * depth + leaf + "]" * depth


def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.fixture(scope="module")
def server(exports):
    settings = ServerSettings(model=str(exports["llava"]), load=LoadSettings(properties=F32, cache_dir=None),
                              max_body_bytes=4 * 1024 * 1024)  # fmt: skip
    with running(create_app(settings)) as base:
        wait_ready(base)
        yield base


@pytest.mark.parametrize("depth, padding", [
    (100_000, 0),  # past the interpreter's recursion limit: json.loads itself gives up
    (MAX_JSON_DEPTH + 50, 0),  # parses, but deeper than a request may be
    (100_000, 2 * 1024 * 1024),  # a large body: parsed in the child process
])  # fmt: skip
def test_deeply_nested_bodies_are_a_400_naming_the_limit(server, depth, padding):
    body = '{"messages": %s, "padding": "%s", "extra": %s}' % (json.dumps(HELLO), "x" * padding, nested(depth))
    started = time.perf_counter()
    response = HTTP.post(f"{server}/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
    error = assert_error(response, 400, "request_too_complex")
    assert f"deeper than {MAX_JSON_DEPTH} levels" in error["message"] and time.perf_counter() - started < 5
    assert_healthy(server)


def test_a_deeply_nested_schema_is_a_400_naming_the_limit(server):
    body = {"messages": HELLO, "response_format": {"type": "json_schema",
                                                    "json_schema": {"name": "deep", "schema": nested_schema(80)}}}  # fmt: skip
    error = assert_error(HTTP.post(f"{server}/v1/chat/completions", json=body), 400, "invalid_json_schema")
    assert f"deeper than {MAX_SCHEMA_DEPTH} levels" in error["message"]
    assert_healthy(server)


def test_the_cli_refuses_a_deeply_nested_schema_file(exports, tmp_path, capsys):
    from llava_ov.cli import main

    for depth in (100_000, MAX_SCHEMA_DEPTH + 10):
        path = tmp_path / f"deep-{depth}.json"
        path.write_text(json.dumps(nested_schema(MAX_SCHEMA_DEPTH + 10)) if depth < 1000 else "{\"a\": " + nested(depth) + "}")
        assert main(["run", str(exports["llava"]), "--prompt", "hi", "--json-schema", str(path), "--f32"]) == 2
        err = capsys.readouterr().err
        assert f"deeper than {MAX_SCHEMA_DEPTH} levels" in err and "Traceback" not in err


def test_an_uncached_hub_id_offline_says_what_to_do(tmp_path):
    """With HF_HUB_OFFLINE=1, a hub id that is not cached is one line saying so and what to do (not
    huggingface_hub's "make sure your Internet connection is on")."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "LLAVA_OV_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "llava_ov.cli", "run", "someone/not-cached-model", "--prompt", "hi"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not in the local Hugging Face cache" in proc.stderr and "unset HF_HUB_OFFLINE" in proc.stderr
    assert "Internet connection" not in proc.stderr
