"""The chat page's handlers, without a browser: page events in, ChatSession calls, page values out."""

from __future__ import annotations

import copy
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import pytest

from conftest import F32
from llava_ov.errors import LlavaOvError
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from llava_ov.frontends.ui import (NEW_IMAGE_NOTE, NO_IMAGE, NO_TEXT, WAITING, ChatPage, TabState, build_demo, launch,
                         update_interval)  # fmt: skip

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CAT, COFFEE = str(EXAMPLES / "cat.jpg"), str(EXAMPLES / "coffee.jpg")
GREEDY = (12, 0.0, 1.0)  # the page's sliders: max new tokens, temperature, top-p


@pytest.fixture(scope="module")
def pipe(exports) -> Pipeline:
    return Pipeline(exports["llava-next"], properties=F32, cache_dir=None)


@pytest.fixture()
def page(pipe) -> ChatPage:
    return ChatPage(pipe)


def turn(page: ChatPage, state: TabState, text: str, files=(), settings=GREEDY) -> list[str]:
    """Send a message as the page does; returns the answer text after each streamed update."""
    page.add_message({"text": text, "files": list(files)}, state)
    return [display[-1]["content"] for display, _ in page.respond(state, *settings)]


def expected(pipe: Pipeline, messages: list[Message], max_new_tokens: int = GREEDY[0]) -> str:
    return pipe.generate(messages, config=GenerationConfig(max_new_tokens=max_new_tokens)).text


def test_answer_with_image_streams_and_equals_generate(page, pipe, monkeypatch):
    fast_forward = pipe.engine.lm.forward

    def forward(batch, **kwargs):  # paced like a real model (the page updates at most ten times a second)
        time.sleep(0.01)
        return fast_forward(batch, **kwargs)

    monkeypatch.setattr(pipe.engine.lm, "forward", forward)
    state = page.new_state()
    updates = turn(page, state, "What is in this picture?", [CAT], settings=(48, 0.0, 1.0))
    answer = updates[-1]
    assert answer == expected(pipe, [Message("user", "What is in this picture?", [CAT])], 48)
    assert len(set(updates) - {""}) > 1 and all(answer.startswith(u) for u in updates)  # grew piece by piece
    assert state.display[-3:] == [
        {"role": "user", "content": {"path": CAT}},
        {"role": "user", "content": "What is in this picture?"},
        {"role": "assistant", "content": answer},
    ]


def test_follow_up_uses_last_image_and_new_image_switches(page, pipe):
    state = page.new_state()
    first = turn(page, state, "What is in this picture?", [CAT])[-1]
    follow_up = turn(page, state, "What colour is it?")[-1]
    conversation = [
        Message("user", "What is in this picture?", [CAT]),
        Message("assistant", first),
        Message("user", "What colour is it?"),
    ]
    assert follow_up == expected(pipe, conversation)
    assert follow_up != expected(pipe, [Message("user", "What colour is it?", [CAT])])  # the history counted

    switched = turn(page, state, "And this one?", [COFFEE])[-1]
    assert switched == expected(pipe, [Message("user", "And this one?", [COFFEE])])
    again = turn(page, state, "Describe it.")[-1]
    assert again == expected(pipe, [Message("user", "And this one?", [COFFEE]), Message("assistant", switched),
                                    Message("user", "Describe it.")])  # fmt: skip
    assert state.chat.last_image == COFFEE
    assert sum(m.get("content") == NEW_IMAGE_NOTE for m in state.display) == 1
    assert [m["content"] for m in state.display if m["role"] == "user" and isinstance(m["content"], str)] == [
        "What is in this picture?", "What colour is it?", "And this one?", "Describe it."
    ]  # fmt: skip


def test_first_message_without_image_is_a_clear_error(page):
    state = page.new_state()
    with pytest.raises(gr.Error) as err:
        page.add_message({"text": "What is in this picture?", "files": []}, state)
    assert err.value.message == NO_IMAGE and "image" in NO_IMAGE
    assert state.display == [] and state.pending is None and state.chat.messages == []
    with pytest.raises(gr.Error, match=NO_TEXT):
        page.add_message({"text": "  ", "files": [CAT]}, state)
    assert turn(page, state, "What is it?", [CAT], settings=(3, 0.0, 1.0))  # the tab still works


def test_bad_image_and_bad_settings_are_clear_errors(page, tmp_path):
    state = page.new_state()
    fake = tmp_path / "notes.jpg"
    fake.write_text("not a picture")
    with pytest.raises(gr.Error) as err:
        page.add_message({"text": "What is it?", "files": [str(fake)]}, state)
    assert "Traceback" not in err.value.message and state.display == []

    page.add_message({"text": "What is it?", "files": [CAT]}, state)
    with pytest.raises(gr.Error, match="top_p"):
        list(page.respond(state, 8, 0.0, 0.0))
    assert state.display == [] and not state.busy and state.chat.messages == []  # the message was withdrawn
    assert turn(page, state, "What is it?", [CAT], settings=(3, 0.0, 1.0))


def test_stop_cancels_the_model_and_the_next_answer_works(pipe):
    page = ChatPage(pipe, GenerationConfig(ignore_eos=True))  # only Stop can end this answer early
    state = page.new_state()
    page.add_message({"text": "Tell me everything.", "files": [CAT]}, state)
    stream = page.respond(state, 2000, 0.0, 1.0)
    while not next(stream)[0][-1]["content"]:  # until the answer has begun
        pass
    with pytest.raises(gr.Error, match="Stop"):
        page.add_message({"text": "Another?", "files": []}, state)  # one message at a time per tab
    shown = page.stop(state)
    assert all(isinstance(v, type(gr.skip())) for v in shown)  # the running answer's respond shows the end
    assert state.cancel.is_set()
    rest = list(stream)  # ends within a step of the model
    assert not state.worker.is_alive() and not state.answering
    result = state.last_result
    assert result.finish_reason == "cancelled" and 0 < len(result.token_ids) < 2000
    display, stats = rest[-1]
    assert display[-1]["content"] == result.text and "stopped" in stats
    assert page.stop(state) == (display, stats)  # Stop again, after the end: the same page
    assert state.chat.messages[-1] == Message("assistant", result.text)  # the stopped answer stays in the chat

    turn(page, state, "Go on.", settings=(4, 0.0, 1.0))
    assert state.last_result.finish_reason == "length" and len(state.last_result.token_ids) == 4


def test_page_closing_the_stream_stops_the_model(pipe):
    """Gradio's cancels= closes the handler's generator: the model must stop too, not run on."""
    page = ChatPage(pipe, GenerationConfig(ignore_eos=True))
    state = page.new_state()
    page.add_message({"text": "Tell me everything.", "files": [CAT]}, state)
    stream = page.respond(state, 2000, 0.0, 1.0)
    next(stream)
    stream.close()
    state.worker.join(30)
    assert not state.worker.is_alive() and state.last_result.finish_reason == "cancelled"
    assert state.chat.messages[-1].role == "assistant"  # the conversation stays whole
    assert pipe.generate("Hi?", [CAT], GenerationConfig(max_new_tokens=2)).finish_reason == "length"


def test_new_chat_during_an_answer_clears_the_page_for_good(pipe):
    page = ChatPage(pipe, GenerationConfig(ignore_eos=True))
    state = page.new_state()
    page.add_message({"text": "Tell me everything.", "files": [CAT]}, state)
    stream = page.respond(state, 2000, 0.0, 1.0)
    while not next(stream)[0][-1]["content"]:
        pass
    assert page.clear(state) == ([], "", None) and not state.worker.is_alive()
    assert list(stream)[-1] == ([], "")  # respond's last word is the cleared page, not the old answer
    assert state.chat.messages == [] and state.display == [] and not state.busy
    assert turn(page, state, "What is it?", [CAT], settings=(3, 0.0, 1.0))  # the tab works on


def test_stop_before_the_model_starts_withdraws_the_message(page):
    state = page.new_state()
    assert page.add_message({"text": "What is it?", "files": [CAT]}, state) == (None, WAITING)  # box cleared
    assert state.busy and [m["content"] for m in state.view()] == [{"path": CAT}, "What is it?"]
    display, _ = page.stop(state)  # the request was still waiting in the queue
    assert display == [] and not state.busy
    assert list(page.respond(state, *GREEDY)) == []  # the cancelled request, if it ran anyway, does nothing


def test_tabs_do_not_leak_into_each_other(page, pipe):
    tab_a, tab_b = page.new_state(), page.new_state()
    answers: dict[str, str] = {}

    def chat(name, state, image):
        answers[name] = turn(page, state, f"Tab {name}: what is it?", [image])[-1]

    threads = [threading.Thread(target=chat, args=a) for a in (("a", tab_a, CAT), ("b", tab_b, COFFEE))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers["a"] == expected(pipe, [Message("user", "Tab a: what is it?", [CAT])])
    assert answers["b"] == expected(pipe, [Message("user", "Tab b: what is it?", [COFFEE])])
    follow_a = turn(page, tab_a, "More?")[-1]
    assert follow_a == expected(pipe, [Message("user", "Tab a: what is it?", [CAT]), Message("assistant", answers["a"]),
                                       Message("user", "More?")])  # fmt: skip
    assert [m.text for m in tab_b.chat.messages] == ["Tab b: what is it?", answers["b"]]
    assert all("Tab a" not in str(m["content"]) for m in tab_b.display)
    page.clear(tab_a)
    assert tab_a.display == [] and tab_a.chat.messages == [] and len(tab_b.chat.messages) == 2


def test_state_copies_share_the_model_not_the_conversation(page):
    """Gradio deep-copies a new tab's state value."""
    state = page.new_state()
    state.chat.messages.append(Message("user", "hi", [CAT]))
    clone = copy.deepcopy(state)
    assert clone.chat.pipeline is page.pipe and clone.chat.messages == state.chat.messages
    clone.chat.messages.clear()
    assert len(state.chat.messages) == 1 and clone.cancel is not state.cancel


def test_stats_and_header(page, exports):
    state = page.new_state()
    turn(page, state, "What is it?", [CAT], settings=(5, 0.0, 1.0))
    _, stats = page.stop(state)  # Stop after the end is harmless and shows the same line
    assert state.stats == stats
    for part in ("5 tokens", "time to first token", "tokens/s", "token limit reached", "image"):
        assert part in stats
    header = page.header()
    assert "llava_next" in header and "CPU" in header and "compute f32" in header and "language fp32" in header
    assert "random weights" in header  # the export's warning is shown


def test_page_wiring(page):
    demo = build_demo(page)
    fns = {f.name: f for f in demo.fns.values()}
    respond = fns["respond"]
    # as many answers at once as the engine runs
    assert respond.concurrency_limit == page.pipe.max_concurrency > 1 and respond.trigger_only_on_success
    assert fns["add_message"].concurrency_limit is None  # accepting a message never waits for the model
    assert fns["view"].concurrency_limit is None and fns["view"].trigger_only_on_success
    # Stop, New chat and the trash icon never cancel respond: it must live to show the answer's end
    assert not any(f.cancels for f in demo.fns.values())
    assert sorted(f.name for f in demo.fns.values() if f.name in ("stop", "clear")) == ["clear", "clear", "stop"]
    assert all(fns[name].concurrency_limit is None for name in ("stop", "clear"))  # never wait for the model
    assert len(page.examples()) == 4


def test_busy_port_is_a_clear_error(page):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LlavaOvError, match=f"127.0.0.1:{port}.*--port"):
            launch(build_demo(page), "127.0.0.1", port, block=False)


def test_cli_registers_ui_and_stays_light():
    from llava_ov.cli import build_parser
    from llava_ov.frontends.ui import cmd_ui

    args = build_parser().parse_args(["ui", "models/demo", "--port", "7861", "--max-new-tokens", "64"])
    assert args.func is cmd_ui and args.port == 7861 and args.host == "127.0.0.1" and not args.share
    assert args.max_new_tokens == 64 and args.device == "CPU"
    code = "import sys, llava_ov.frontends.ui, llava_ov.cli; llava_ov.cli.build_parser(); print('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_long_answers_update_the_page_less_often():
    intervals = [update_interval(n) for n in (0, 500, 5_000, 20_000, 1_000_000)]
    assert intervals == sorted(intervals) and intervals[0] > 0 and intervals[-1] <= 2.0


def test_two_tabs_are_answered_at_the_same_time(page, pipe, monkeypatch):
    """Two tabs' answers overlap in time (no page lock), and each equals its answer alone."""
    fast_forward = pipe.engine.lm.forward

    def forward(batch, **kwargs):
        time.sleep(0.005)
        return fast_forward(batch, **kwargs)

    monkeypatch.setattr(pipe.engine.lm, "forward", forward)
    tabs = [page.new_state(), page.new_state()]
    spans: dict[int, list[float]] = {0: [], 1: []}

    def run(i):
        page.add_message({"text": f"Question {i}: what is it?", "files": [CAT]}, tabs[i])
        for display, _ in page.respond(tabs[i], 40, 0.0, 1.0):
            if display[-1]["role"] == "assistant" and display[-1]["content"]:  # the answer has text
                spans[i].append(time.monotonic())

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(spans.values()) and max(s[0] for s in spans.values()) < min(s[-1] for s in spans.values())  # overlap
    for i, tab in enumerate(tabs):
        alone = expected(pipe, [Message("user", f"Question {i}: what is it?", [CAT])], 40)
        assert tab.display[-1]["content"] == alone


def test_page_image_token_settings_reach_the_answer_and_the_stats(page, photos):
    state = page.new_state()
    page.add_message({"text": "What is it?", "files": [str(photos["chelsea"])]}, state)
    list(page.respond(state, *GREEDY, 1200, 0.0))
    assert state.last_result.image_tokens <= 1200 < state.last_result.image_tokens_total
    assert "image tokens kept" in state.stats
    page.clear(state)
    page.add_message({"text": "What is it?", "files": [str(photos["chelsea"])]}, state)
    list(page.respond(state, *GREEDY, 0, 0.5))
    assert state.last_result.image_tokens < state.last_result.image_tokens_total


def test_ui_command_prints_its_own_address_line_without_gradios_share_hint(exports):
    """`llava-ov ui` says where the page is; Gradio's "set `share=True` in `launch()`" (its API, not
    our --share flag) is not printed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llava_ov.cli", "ui", str(exports["llava"]), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("chat page:"):
                break
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    text = "".join(lines) + out
    assert f"chat page: http://127.0.0.1:{port}" in text, text
    assert "share=True" not in text and "launch()" not in text, text
