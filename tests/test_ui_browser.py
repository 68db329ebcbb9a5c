"""The chat page end to end: a real server on localhost, driven in headless Chromium by Playwright.

Screenshots land in artifacts/ (gitignored).  Only a missing /usr/bin/chromium skips these tests.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import F32

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CAT = ROOT / "examples" / "cat.jpg"
DEFAULT_TOKENS = 60  # the page's default "max new tokens"
STEP_S = 0.02  # extra time per token: the tiny model decodes ~500 tokens/s, a 7B on a CPU ~10-30
LONG = 4000  # an answer only Stop can end in time

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium (README)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(exports):
    """The page for the tiny model on a free localhost port; yields (url, pipeline)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from llava_ov.runtime.generate import GenerationConfig
    from llava_ov.runtime.pipeline import Pipeline
    from llava_ov.frontends.ui import ChatPage, build_demo, launch

    pipe = Pipeline(exports["llava-next"], properties=F32, cache_dir=None)
    fast_forward = pipe.engine.lm.forward

    def forward(batch, **kwargs):
        time.sleep(STEP_S)
        return fast_forward(batch, **kwargs)

    pipe.engine.lm.forward = forward  # paced like a real model, so answers stream for a while and the page keeps up
    page = ChatPage(pipe, GenerationConfig(max_new_tokens=DEFAULT_TOKENS, ignore_eos=True))  # noise never ends early
    demo = build_demo(page)
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/", pipe
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def open_tab(browser, server):
    """Opens the page in a new tab; requests that leave localhost are blocked and recorded."""
    url, _ = server
    context = browser.new_context(viewport={"width": 1100, "height": 1300})
    outside: list[str] = []

    def only_local(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)

    def open_():
        tab = context.new_page()
        tab.goto(url)
        tab.wait_for_selector("#message textarea", timeout=60_000)
        return tab

    yield open_
    context.close()
    assert outside == []  # the page works offline: nothing asked for the internet


# ---------------------------------------------------------------- page helpers


def send(tab, text: str, image: Path | None = None) -> None:
    if image is not None:
        tab.set_input_files("#message input[type=file]", str(image))
        tab.wait_for_selector("#message img", timeout=30_000)  # the upload's thumbnail
    tab.fill("#message textarea", text)
    tab.press("#message textarea", "Enter")


def answers(tab) -> list[str]:
    return tab.locator('#chat [data-testid="bot"]').all_inner_texts()


def wait_answer(tab, count: int, finished: str = "token limit reached", timeout: int = 60_000) -> str:
    """Wait for the `count`-th answer to finish (its stats line says how); returns the stats line."""
    try:
        tab.wait_for_function(
            "([n, how]) => document.querySelectorAll('#chat [data-testid=bot]').length >= n"
            " && (document.querySelector('#stats')?.innerText || '').includes(how)",
            arg=[count, finished], timeout=timeout,
        )  # fmt: skip
    except Exception as exc:  # say what the page showed instead
        raise AssertionError(f"answer {count} not {finished!r}: stats {tab.inner_text('#stats')!r}, "
                             f"{len(answers(tab))} answers") from exc  # fmt: skip
    return tab.inner_text("#stats")


def set_max_tokens(tab, value: int) -> None:
    """Type into the slider's number box until the page holds the value (the accordion mounts lazily)."""
    if not tab.is_visible("#max-new-tokens"):
        tab.locator("#settings").get_by_text("Settings", exact=True).first.click()
    slider = "document.querySelector('#max-new-tokens input[type=range]')"
    for _ in range(5):
        box = tab.locator("#max-new-tokens input[type=number]")
        box.fill(str(value))
        box.press("Enter")
        tab.wait_for_timeout(300)
        if tab.evaluate(f"() => {slider}?.value") == str(value):
            return
    raise AssertionError(f"could not set max new tokens to {value}")


def watch_growth(tab) -> None:
    """Record the length of the last answer on every change the page renders."""
    tab.evaluate("""() => {
        window.__lengths = [];
        const last = () => [...document.querySelectorAll('#chat [data-testid=bot]')].pop();
        new MutationObserver(() => window.__lengths.push(last() ? last().innerText.length : 0))
            .observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
    }""")


def seen_lengths(tab) -> set[int]:
    return set(tab.evaluate("() => window.__lengths")) - {0}


def stats_tokens(stats: str) -> int:
    return int(re.search(r"(\d+) tokens ·", stats).group(1))


# ---------------------------------------------------------------- tests


def test_chat_with_photo_follow_up_and_stop(open_tab, server):
    _, pipe = server
    tab = open_tab()
    header = tab.inner_text("#header")
    assert "device CPU" in header and "language fp32" in header and "compute f32" in header, header

    watch_growth(tab)
    send(tab, "What is in this picture?", CAT)
    stats = wait_answer(tab, 1)
    assert len(seen_lengths(tab)) >= 2, stats  # the answer appeared piece by piece
    assert answers(tab)[0] and stats_tokens(stats) == DEFAULT_TOKENS
    assert tab.locator('#chat [data-testid="user"] img').count() == 1  # the photo is in the chat

    send(tab, "What colour is it?")
    stats = wait_answer(tab, 2)
    image_tokens = int(re.search(r"\((\d+) image", stats).group(1))
    assert image_tokens > 0 and "What colour is it?" in tab.inner_text("#chat")  # the follow-up saw the photo
    assert len(answers(tab)) == 2 and answers(tab)[1]
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "ui-chat.png"), full_page=True)

    set_max_tokens(tab, LONG)
    send(tab, "Tell me everything about it.")
    tab.wait_for_function("() => document.querySelectorAll('#chat [data-testid=bot]').length >= 3"
                          " && document.querySelectorAll('#chat [data-testid=bot]')[2].innerText.length > 0")
    tab.wait_for_timeout(500)  # let it stream a little
    tab.click("#stop")
    stats = wait_answer(tab, 3, finished="stopped", timeout=30_000)
    stopped = answers(tab)[2]
    assert 0 < stats_tokens(stats) < LONG
    tab.wait_for_timeout(1500)
    assert answers(tab)[2] == stopped  # it stopped growing
    from llava_ov.runtime.generate import GenerationConfig

    free = threading.Thread(target=pipe.generate, args=("Still there?", [CAT], GenerationConfig(max_new_tokens=2)))
    free.start()
    free.join(30)
    assert not free.is_alive()  # the model itself stopped: it is free for the next request

    set_max_tokens(tab, 8)
    send(tab, "Thanks. One more word?")
    stats = wait_answer(tab, 4)
    assert stats_tokens(stats) == 8 and answers(tab)[3]
    tab.screenshot(path=str(ARTIFACTS / "ui-after-stop.png"), full_page=True)

    tab.click("#clear")
    tab.wait_for_function("() => document.querySelectorAll('#chat [data-testid=bot]').length == 0")
    assert tab.inner_text("#stats").strip() == ""


def test_first_message_without_image_shows_error(open_tab):
    from llava_ov.frontends.ui import NO_IMAGE

    tab = open_tab()
    send(tab, "What is in this picture?")
    error = tab.get_by_text(NO_IMAGE)
    error.wait_for(timeout=30_000)
    assert error.is_visible() and answers(tab) == []
    assert tab.input_value("#message textarea") == "What is in this picture?"  # nothing lost: add a photo, resend
    tab.wait_for_timeout(800)  # the notice's fade-in
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "ui-error.png"), full_page=True)


def test_two_tabs_answer_together_and_do_not_leak(open_tab):
    tab_a, tab_b = open_tab(), open_tab()
    set_max_tokens(tab_a, LONG)
    send(tab_a, "Tab A: tell me everything.", CAT)
    tab_a.wait_for_function("() => document.querySelectorAll('#chat [data-testid=bot]').length >= 1")
    tab_b.get_by_text("What is in the cup?").click()  # an example: the coffee photo and its question
    tab_b.wait_for_selector("#message img", timeout=30_000)
    tab_b.press("#message textarea", "Enter")
    stats_b = wait_answer(tab_b, 1, timeout=60_000)  # tab B is answered while tab A's long answer runs
    assert stats_tokens(stats_b) == DEFAULT_TOKENS
    assert "Last answer" not in tab_a.inner_text("#stats")  # ... and tab A is still answering
    tab_a.click("#stop")
    wait_answer(tab_a, 1, finished="stopped", timeout=30_000)
    chat_a, chat_b = tab_a.inner_text("#chat"), tab_b.inner_text("#chat")
    assert "Tab A" in chat_a and "What is in the cup?" in chat_b
    assert "What is in the cup?" not in chat_a and "Tab A" not in chat_b
    assert answers(tab_a)[0] not in chat_b and answers(tab_b)[0] not in chat_a
    assert len(answers(tab_a)) == 1 and len(answers(tab_b)) == 1


def test_closing_a_tab_stops_its_answer(open_tab, server):
    from llava_ov.runtime.generate import GenerationConfig

    _, pipe = server
    tab = open_tab()
    set_max_tokens(tab, LONG)
    send(tab, "Tell me everything.", CAT)
    tab.wait_for_function("() => (document.querySelector('#chat [data-testid=bot]')?.innerText || '').length > 0")
    tab.close()
    free = threading.Thread(target=pipe.generate, args=("Still there?", [CAT], GenerationConfig(max_new_tokens=2)))
    free.start()
    free.join(30)  # the 4,000-token answer would hold the model for minutes
    assert not free.is_alive()


# ---------------------------------------------------------------- video (LLaVA-NeXT-Video)


@pytest.fixture(scope="module")
def video_page(video_export, tmp_path_factory):
    """The page for the tiny LLaVA-NeXT-Video model, and a short H.264 clip to upload."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from llava_ov.frontends.ui import ChatPage, build_demo, launch
    from llava_ov.runtime.generate import GenerationConfig
    from llava_ov.runtime.pipeline import Pipeline
    from videos import write_video

    clip = write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", 12, size=(160, 120), fps=12)
    pipe = Pipeline(video_export, properties=F32, cache_dir=None)
    demo = build_demo(ChatPage(pipe, GenerationConfig(max_new_tokens=12, num_frames=4)))
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/", pipe, clip
    demo.close()


def test_video_conversation_in_the_browser(browser, video_page):
    from llava_ov.runtime.generate import GenerationConfig

    url, pipe, clip = video_page
    context = browser.new_context(viewport={"width": 1100, "height": 1300})
    tab = context.new_page()
    tab.goto(url)
    tab.wait_for_selector("#message textarea", timeout=60_000)
    tab.set_input_files("#message input[type=file]", str(clip))
    tab.wait_for_selector("#message video, #message .thumbnail-item", timeout=30_000)  # the upload's preview
    tab.fill("#message textarea", "What happens in this video?")
    tab.press("#message textarea", "Enter")
    stats = wait_answer(tab, 1, finished="·")
    tab.wait_for_function("() => (document.querySelector('#stats')?.innerText || '').includes('video (4 frames)')",
                          timeout=60_000)  # fmt: skip
    expected = pipe.generate("What happens in this video?", config=GenerationConfig(max_new_tokens=12, num_frames=4),
                             videos=[clip])  # fmt: skip
    assert answers(tab)[0].strip() == expected.text.strip(), stats
    assert tab.locator('#chat [data-testid="user"] video').count() == 1  # the video is shown in the conversation
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / "ui-video.png"), full_page=True)
    context.close()
