"""Tool calling on /v1/chat/completions through the official openai client: every call names an offered function
and its arguments validate against the function's schema (both families, greedy and sampled, streamed and not),
tool_choice none/auto/required/named, parallel_tool_calls, and tool results sent back."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import jsonschema
import openai
import pytest

from conftest import F32
from llava_ov.frontends.server.app import create_app
from llava_ov.frontends.server.mapping import to_messages
from llava_ov.frontends.server.schemas import ChatCompletionRequest
from llava_ov.frontends.server.settings import ServerSettings
from llava_ov.runtime.settings import LoadSettings
from llava_ov.runtime.tools import CALL_OPEN, RESULT_OPEN
from test_server import openai_client, running, wait_ready

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}  # fmt: skip
CLOCK = {"type": "object", "properties": {"hours": {"type": "integer", "minimum": 0, "maximum": 23}},
         "required": ["hours"], "additionalProperties": False}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "set_alarm", "description": "An alarm at an hour", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "set_alarm": CLOCK}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLED = dict(temperature=1.0, seed=4)


@pytest.fixture(scope="module", params=["llava", "llava-next"])
def client(request, exports):
    with openai_client(exports[request.param]) as client:
        yield client


def calls_of(client, stream: bool, **kwargs) -> tuple[list[tuple[str, dict]], str | None, str | None]:
    """(calls as (name, arguments), text content, finish_reason), assembled from the stream as clients do."""
    request = dict(model="m", messages=ASK, tools=TOOLS, max_tokens=120, **kwargs)
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        return calls, choice.message.content, choice.finish_reason
    parts: dict[int, dict] = {}
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                part = parts.setdefault(delta.index, {"name": "", "arguments": ""})
                part["name"] += delta.function.name or ""
                part["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    calls = [(p["name"], json.loads(p["arguments"])) for _, p in sorted(parts.items())]
    return calls, text or None, finish


def assert_valid(calls) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(arguments, SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_required_calls_validate(client, stream, sampling):
    calls, text, finish = calls_of(client, stream, tool_choice="required", **sampling)
    assert_valid(calls)
    assert finish in ("tool_calls", "length") and not text  # length: more calls followed until max_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_named_function_is_the_one_called(client, stream):
    calls, _, finish = calls_of(client, stream, tool_choice={"type": "function", "function": {"name": "set_alarm"}},
                                parallel_tool_calls=False, **SAMPLED)  # fmt: skip
    assert_valid(calls)
    assert [name for name, _ in calls] == ["set_alarm"] and finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_auto_is_text_or_valid_calls(client, stream, seed):
    calls, text, finish = calls_of(client, stream, tool_choice="auto", temperature=1.0, seed=seed)
    if calls:
        assert_valid(calls)
        assert finish == "tool_calls" and not text
    else:
        assert text and not text.startswith("<") and finish in ("stop", "length")


def test_none_answers_as_without_tools(client):
    plain = client.chat.completions.create(model="m", messages=ASK, max_tokens=12).choices[0].message.content
    answer = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=12)
    assert answer.choices[0].message.content == plain and answer.choices[0].message.tool_calls is None


def test_a_tool_result_goes_back_into_the_conversation(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}  # fmt: skip
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]  # fmt: skip
    answer = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    request = ChatCompletionRequest.model_validate({"messages": messages, "tools": TOOLS})
    rendered = asyncio.run(to_messages(request, ServerSettings(model="unused"), None, None))
    assert [m.role for m in rendered] == ["user", "assistant", "user"]
    assert rendered[0].text.startswith("You can call these functions") and "get_weather" in rendered[0].text
    assert rendered[1].text == CALL_OPEN + '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
    assert rendered[2].text.startswith(RESULT_OPEN) and '{"temperature": 21}' in rendered[2].text


@pytest.mark.parametrize("kwargs, param", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]), "tools"),
    (dict(tools=[TOOLS[0], TOOLS[0]]), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"),
])  # fmt: skip
def test_bad_tool_requests_are_refused(client, kwargs, param):
    request = {"model": "m", "messages": ASK, "tools": TOOLS, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    assert caught.value.body["param"] == param


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_call_cut_by_max_tokens_is_length_with_its_text(client, stream):
    request = dict(model="m", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=5)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **request))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    else:
        choice = client.chat.completions.create(**request).choices[0]
        text, finish = choice.message.content, choice.finish_reason
        assert choice.message.tool_calls is None
    assert finish == "length" and text.startswith(CALL_OPEN[:5])


def test_an_agent_frameworks_tool_loop(exports):
    """The OpenAI Agents SDK's loop against this server: the model calls a Python function (arguments validated
    by the SDK against the function's signature), the SDK runs it, and its result ends the run."""
    agents = pytest.importorskip("agents")  # the dev extra installs it; a bare install may not
    seen = []

    @agents.function_tool
    def set_mood(mood: Literal["calm", "busy", "sleepy"]) -> str:
        """Sets the mood of the house."""
        seen.append(mood)
        return f"mood set to {mood}"

    settings = ServerSettings(model=str(exports["llava"]), load=LoadSettings(properties=F32, cache_dir=None))
    with running(create_app(settings)) as base:
        wait_ready(base)
        agents.set_tracing_disabled(True)
        model = agents.OpenAIChatCompletionsModel(model="m", openai_client=openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x"))
        agent = agents.Agent(name="house", instructions="Set the mood.", tools=[set_mood], model=model,
                             model_settings=agents.ModelSettings(tool_choice="required", max_tokens=60),
                             tool_use_behavior="stop_on_first_tool")  # fmt: skip
        result = agents.Runner.run_sync(agent, "Make the house calm.")
    assert len(seen) >= 1 and seen[0] in ("calm", "busy", "sleepy")
    assert result.final_output == f"mood set to {seen[0]}"


# A tool-aware template (Qwen2.5's layout, trimmed): it renders the function list, calls and results itself.
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content[0].text }}
</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{% for c in message.content %}{% if c.type == "image" %}<image>{% elif c.type == "text" %}{{ c.text }}{% endif %}{% endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}  # fmt: skip
CONVERSATION = [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]  # fmt: skip


@pytest.fixture(scope="module")
def tool_template_export(exports, tmp_path_factory):
    """The tiny LLaVA export with a chat template that renders tools."""
    import shutil

    folder = tmp_path_factory.mktemp("tools") / "export"
    shutil.copytree(exports["llava"], folder)
    (folder / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return folder


def test_a_tool_aware_template_renders_tools_calls_and_results_as_transformers(tool_template_export, checkpoints):
    from transformers import AutoTokenizer

    from llava_ov.runtime.pipeline import Pipeline

    request = ChatCompletionRequest.model_validate({"messages": CONVERSATION, "tools": TOOLS})
    messages = asyncio.run(to_messages(request, ServerSettings(model="unused"), None, None, native_tools=True))
    assert [m.role for m in messages] == ["user", "assistant", "tool"] and "You can call" not in messages[0].text
    pipe = Pipeline(tool_template_export, properties=F32, cache_dir=None)
    assert pipe.template_renders_tools
    ours = pipe.render(messages, TOOLS)
    reference = AutoTokenizer.from_pretrained(checkpoints["llava"]).apply_chat_template(
        [m.for_template() for m in messages], tools=TOOLS, chat_template=TOOL_TEMPLATE, tokenize=False,
        add_generation_prompt=True,
    )  # fmt: skip
    assert ours == reference and "<tools>" in ours and '<tool_call>{"name": "get_weather"' in ours


def test_the_server_lets_a_tool_aware_template_render_the_tools(tool_template_export):
    with openai_client(tool_template_export) as client:
        answer = client.chat.completions.create(model="m", messages=CONVERSATION, tools=TOOLS, tool_choice="required",
                                                max_tokens=120)  # fmt: skip
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in answer.choices[0].message.tool_calls]
    assert_valid(calls)
