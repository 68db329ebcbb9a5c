"""POST /v1/responses (stateless subset) through the official openai client: text and image input, instructions,
function tools, JSON output, streaming events, usage with cached tokens — each answer equal to the pipeline's."""

from __future__ import annotations

import base64
import json

import jsonschema
import openai
import pytest

from conftest import F32
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from test_server import openai_client
from test_tools import SCHEMAS, TOOLS

FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses API's flat tool form


@pytest.fixture(scope="module")
def pipe(exports) -> Pipeline:
    return Pipeline(exports["llava-next"], properties=F32, cache_dir=None)


@pytest.fixture(scope="module")
def client(exports, pipe):
    with openai_client(exports["llava-next"], pipe) as client:
        yield client


def image_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_text_input_equals_the_pipeline(client, pipe):
    expected = pipe.generate([Message("system", "Be brief."), Message("user", "Hello there")],
                             config=GenerationConfig(max_new_tokens=10))  # fmt: skip
    response = client.responses.create(model="m", instructions="Be brief.", input="Hello there", max_output_tokens=10)
    assert response.output_text == expected.text and response.status == "incomplete"  # cut by max_output_tokens
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == expected.prompt_tokens and response.usage.output_tokens == 10


def test_image_input_and_streaming_events(client, pipe, photos):
    expected = pipe.generate([Message("user", "What is this?", [photos["chelsea"]])], config=GenerationConfig(max_new_tokens=8))
    content = [{"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": image_url(photos["chelsea"])}]
    items = [{"role": "user", "content": content}]
    assert client.responses.create(model="m", input=items, max_output_tokens=8).output_text == expected.text
    events = list(client.responses.create(model="m", input=items, max_output_tokens=8, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected.text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == expected.text and final.usage.input_tokens == expected.prompt_tokens


def test_usage_reports_cached_tokens(client, pipe):
    pipe.clear_caches()
    text = "The same long question, asked twice. " * 12
    first = client.responses.create(model="m", input=text, max_output_tokens=2)
    second = client.responses.create(model="m", input=text, max_output_tokens=2)
    assert first.usage.input_tokens_details.cached_tokens == 0 < second.usage.input_tokens_details.cached_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_function_calls_validate_and_their_results_go_back(client, stream):
    request = dict(model="m", input="Weather in Paris?", tools=FLAT_TOOLS, tool_choice="required", max_output_tokens=120,
                   temperature=1.0, extra_body={"seed": 2})  # fmt: skip
    if stream:
        events = list(client.responses.create(stream=True, **request))
        output = events[-1].response.output
        assert any(e.type == "response.function_call_arguments.done" for e in events)
    else:
        output = client.responses.create(**request).output
    calls = [item for item in output if item.type == "function_call"]
    assert calls and len(calls) == len(output)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    follow_up = [{"role": "user", "content": "Weather in Paris?"},
                 {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name, "arguments": calls[0].arguments},
                 {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature": 21}'}]  # fmt: skip
    answer = client.responses.create(model="m", input=follow_up, tools=FLAT_TOOLS, tool_choice="none", max_output_tokens=6)
    assert answer.output[0].type == "message" and answer.output_text


def test_json_schema_output(client):
    schema = {"type": "object", "properties": {"animal": {"enum": ["cat", "dog"]}}, "required": ["animal"],
              "additionalProperties": False}  # fmt: skip
    fmt = {"format": {"type": "json_schema", "name": "pet", "schema": schema}}
    response = client.responses.create(model="m", input="Which pet?", text=fmt, max_output_tokens=20)
    jsonschema.validate(json.loads(response.output_text), schema)


@pytest.mark.parametrize("extra, param", [
    (dict(previous_response_id="resp_x"), "previous_response_id"),
    (dict(store=True), "store"),
    (dict(tools=[{"type": "web_search"}]), "tools"),
])  # fmt: skip
def test_stateful_and_unsupported_requests_are_refused(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="m", input="hi", **extra)
    assert caught.value.body["param"] == param
