"""`llava-ov ui`: a Gradio chat page about images, thin over `ChatSession`.

`ChatPage` holds the handler functions; each turns a page event into
ChatSession calls and can be tested without a browser.  `build_demo` wires
them into a `gr.Blocks` page, `register` adds the subcommand.  Every browser
tab gets its own `TabState` (a ChatSession, what its chat shows, and the
cancel Event of its running answer) through `gr.State`; as many tabs are answered at
once as the pipeline's engine runs, the rest wait in the Gradio queue.  While an
answer runs, its `respond` generator is the only writer of the chat and the stats
line: Stop and New chat set the cancel Event and let it show the end (a second
writer would race it in the browser).  Gradio is imported only inside functions so
`llava-ov --help` stays fast.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_ov.runtime.chat import ChatSession
from llava_ov.common.layout import EXAMPLES_DIR
from llava_ov.errors import LlavaOvError
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import GenerationResult, Pipeline
from llava_ov.runtime.video import VIDEO_EXTENSIONS, VideoCancelled

EXAMPLES = (
    ("cat.jpg", "What animal is this, and what is it doing?"),
    ("coffee.jpg", "What is in the cup?"),
    ("astronaut.jpg", "Who is this person and what are they wearing?"),
    ("rocket.jpg", "Describe this scene."),
)
MAX_QUEUE = 64  # requests waiting for the model, all tabs together; more are refused
MAX_UPLOAD_BYTES = 50_000_000  # the same bound as image.load_image, enforced by gradio during the upload
MAX_NEW_TOKENS_LIMIT = 4096  # top of the page's slider
MIN_UPDATE_S, MAX_UPDATE_S = 0.1, 2.0  # streamed updates to the page: at most ten a second ...
RENDER_CHARS_PER_S = 10_000  # ... and no more characters re-rendered per second than this
STOP_WAIT_S = 30.0  # how long New chat waits for the stopped answer to end (the model stops within a step)
NO_IMAGE = "Attach an image to your first message: the assistant answers questions about a picture."
NO_VISUAL = "Attach an image or a video to your first message: the assistant answers questions about them."
NO_TEXT = "Type a question to go with your message."
WAITING = "waiting for the model…"
BUSY = "Wait for the answer to your last message, or press Stop, before sending another."
NEW_IMAGE_NOTE = "New image: the conversation starts over from here (earlier turns are not sent to the model)."
NEW_VIDEO_NOTE = "New video: the conversation starts over from here (earlier turns are not sent to the model)."
_END = object()  # marks the end of a worker's chunks


@dataclass
class TabState:
    """One browser tab's conversation: never shared between tabs."""

    chat: ChatSession
    display: list[dict[str, Any]] = field(default_factory=list)  # what the tab's Chatbot shows
    pending: tuple[str, list[str], list[str]] | None = None  # accepted message (text, images, videos) waiting
    pending_from: int = 0  # display index where the pending message starts
    cancel: threading.Event = field(default_factory=threading.Event)  # of the running answer
    worker: threading.Thread | None = None
    last_result: GenerationResult | None = None
    stats: str = ""
    answering: bool = False  # a respond generator owns the chat
    epoch: int = 0  # counts New chats: an answer begun before one shows nothing of itself
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # pending/cancel/epoch handovers

    def view(self) -> list[dict[str, Any]]:
        """A copy of the chat for the page (gradio streams the diff to the value it sent last)."""
        return [dict(m) for m in self.display]

    @property
    def has_visual(self) -> bool:
        """The conversation has an image or a video that questions can refer to."""
        return self.chat.last_image is not None or self.chat.last_video is not None

    @property
    def busy(self) -> bool:
        """A message of this tab is waiting for the model or being answered."""
        return self.pending is not None or (self.worker is not None and self.worker.is_alive())

    def close(self) -> None:
        """Stop this tab's answer (the tab was closed or its state expired)."""
        self.cancel.set()

    def __deepcopy__(self, memo: dict) -> TabState:
        """Gradio deep-copies new state values: copy the conversation, share the pipeline."""
        chat = ChatSession(self.chat.pipeline, system=self.chat.system, truncate=self.chat.truncate)
        chat.messages = copy.deepcopy(self.chat.messages, memo)
        chat.frames_per_video = self.chat.frames_per_video
        return TabState(chat, copy.deepcopy(self.display, memo), copy.deepcopy(self.pending, memo), self.pending_from)


class ChatPage:
    """The page's event handlers: page values in, ChatSession calls, page values out."""

    def __init__(self, pipe: Pipeline, config: GenerationConfig | None = None, system: str | None = None):
        self.pipe = pipe
        self.config = config or GenerationConfig()
        self.system = system  # tabs answer concurrently: each turn is a sequence of the pipeline's engine

    def new_state(self) -> TabState:
        """A fresh conversation for a newly opened tab."""
        return TabState(ChatSession(self.pipe, system=self.system))

    # ---------------------------------------------------------------- events

    def add_message(self, message: dict[str, Any] | None, state: TabState) -> tuple[None, str]:
        """Accept a message (text + uploaded files): show it and queue it for the model.

        Raises gr.Error for a message the model cannot answer; the chat is left as it was.
        """
        gr = _gradio()
        if state.busy:
            raise gr.Error(BUSY, title="Still answering")
        text = str((message or {}).get("text") or "").strip()
        files = [_file_path(f) for f in (message or {}).get("files") or []]
        videos = [path for path in files if _is_video(path)]
        images = [path for path in files if path not in videos]
        takes_video = self.pipe.model.family.takes_video
        if not files and not state.has_visual:
            raise gr.Error(NO_VISUAL if takes_video else NO_IMAGE, title="No image")
        if not text:
            raise gr.Error(NO_TEXT, title="No question")
        for path in images:
            _check_image(path)
        for path in videos:
            _check_video(path, takes_video)
        state.pending_from = len(state.display)
        if files and state.has_visual:
            note, title = (NEW_VIDEO_NOTE, "New video") if videos else (NEW_IMAGE_NOTE, "New image")
            state.display.append({"role": "assistant", "content": note, "metadata": {"title": title}})
        state.display += [{"role": "user", "content": {"path": path}} for path in files]
        state.display.append({"role": "user", "content": text})
        state.pending = (text, images, videos)
        state.stats = WAITING
        return None, state.stats

    def respond(
        self, state: TabState, max_new_tokens: float, temperature: float, top_p: float,
        max_image_tokens: float | None = None, pruning: float | None = None,
    ) -> Iterator[tuple[list[dict], str]]:  # fmt: skip
        """Stream the answer to the pending message: yields (chat messages, stats line)."""
        gr = _gradio()
        if state.pending is None:
            return
        try:
            config = self.settings(max_new_tokens, temperature, top_p, max_image_tokens, pruning)
        except gr.Error:
            self._drop_unanswered(state)
            yield state.view(), state.stats
            raise
        with state.lock:  # Stop either withdraws the pending message or cancels this answer
            if state.pending is None:
                return
            (text, images, videos), state.pending = state.pending, None
            state.cancel = cancel = threading.Event()
            epoch, state.answering = state.epoch, True
        earlier = list(state.chat.messages)
        if (images or videos) and state.has_visual:
            state.chat.reset()  # a new image or video starts a new conversation (LLaVA answers about one)
        chunks: queue.Queue = queue.Queue()
        on_progress = lambda done, total: chunks.put(Prefill(done, total))  # noqa: E731
        stream = state.chat.stream(text, images, config, cancel, progress=on_progress, videos=videos)
        state.worker = threading.Thread(target=_pump, args=(state, stream, chunks), daemon=True)
        state.display.append({"role": "assistant", "content": ""})
        state.last_result, state.stats = None, "generating…"
        state.worker.start()
        answer = state.display[-1]
        try:
            yield state.view(), state.stats
            # after Stop the model ends within a step: the rest is shown, ending with "stopped"
            for batch in _batches(chunks, lambda: update_interval(len(answer["content"]))):
                if state.epoch != epoch:  # New chat: the page was cleared, the answer is dropped
                    continue
                error = next((c for c in batch if isinstance(c, BaseException)), None)
                if error is not None:
                    state.chat.messages[:] = earlier  # a failed turn leaves the conversation as it was
                    del state.display[state.pending_from :]
                    state.stats = ""
                    yield state.view(), state.stats
                    if isinstance(error, VideoCancelled):  # Stop while the video was read: withdrawn, as before
                        return  # the model starts (no error to show)
                    if isinstance(error, LlavaOvError):
                        raise gr.Error(str(error), title="Could not answer")
                    raise error
                self._show(state, batch)
                yield state.view(), state.stats
            if state.epoch != epoch:
                yield state.view(), state.stats  # the cleared page, as New chat left it
        finally:
            cancel.set()  # the page stopped listening (closed tab, lost connection): stop the model too
            state.answering = False

    def stop(self, state: TabState) -> tuple[Any, Any]:
        """Stop button: withdraw a message still waiting for the model, or stop the running
        answer within a step (its `respond` then shows the end; the page is left to it)."""
        with state.lock:
            state.cancel.set()
            self._drop_unanswered(state)
            if not state.answering:
                return state.view(), state.stats
        gr = _gradio()
        return gr.skip(), gr.skip()

    def clear(self, state: TabState) -> tuple[list[dict], str, None]:
        """New chat: stop any answer and forget the conversation."""
        with state.lock:
            state.cancel.set()
            state.epoch += 1
            state.pending = None
        self._wait(state)  # the stopped answer is added to the conversation before it is forgotten
        state.chat.reset()
        state.display.clear()
        state.last_result, state.stats = None, ""
        return state.view(), state.stats, None

    # ---------------------------------------------------------------- helpers

    def settings(
        self, max_new_tokens: float, temperature: float, top_p: float,
        max_image_tokens: float | None = None, pruning: float | None = None,
    ) -> GenerationConfig:  # fmt: skip
        """The page's settings over the command line's generation settings (image tokens: 0 = no limit)."""
        config = dataclasses.replace(
            self.config, max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p)
        )
        if max_image_tokens is not None:
            config.max_image_tokens = int(max_image_tokens) or None
        if pruning is not None:
            config.visual_token_pruning = float(pruning)
        try:
            config.validate()
        except LlavaOvError as exc:
            raise _gradio().Error(str(exc), title="Invalid settings") from None
        return config

    def header(self) -> str:
        """Markdown naming the model, device and precision that are running, plus its warnings."""
        about = "an image or a video" if self.pipe.model.family.takes_video else "an image"
        lines = [f"## llava-ov — chat about {about}", describe_pipeline(self.pipe.info())]
        lines += [f"**Warning:** {w}" for w in self.pipe.warnings()]
        return "\n\n".join(lines)

    def examples(self) -> list[dict[str, Any]]:
        """Example messages with the photos in examples/ (none when the folder is not there)."""
        return [
            {"text": prompt, "files": [str(EXAMPLES_DIR / name)]}
            for name, prompt in EXAMPLES
            if (EXAMPLES_DIR / name).exists()
        ]

    def _show(self, state: TabState, chunks: list) -> None:
        for chunk in chunks:
            if isinstance(chunk, Prefill):
                state.stats = f"reading the prompt… {chunk.done:,} of {chunk.total:,} tokens"
                continue
            state.display[-1]["content"] += chunk.text
            if chunk.result is not None:
                state.stats = format_stats(chunk.result)

    @staticmethod
    def _wait(state: TabState) -> None:
        if state.worker is not None and state.worker is not threading.current_thread():
            state.worker.join(STOP_WAIT_S)

    @staticmethod
    def _drop_unanswered(state: TabState) -> bool:
        """Remove a message whose request was cancelled before the model took it (True if one was)."""
        if state.pending is None:
            return False
        del state.display[state.pending_from :]
        state.pending = None
        state.stats = format_stats(state.last_result) if state.last_result else ""
        return True


def format_stats(result: GenerationResult) -> str:
    """One line of per-answer statistics for the page."""
    t = result.timings
    reason = {"eos": "finished", "length": "token limit reached", "stop": "stop string", "cancelled": "stopped"}
    return (
        f"**Last answer:** {len(result.token_ids)} tokens · time to first token {t.ttft_s:.2f} s · "
        f"{t.tokens_per_s:.1f} tokens/s · {reason.get(result.finish_reason, result.finish_reason)} · "
        f"prompt {result.prompt_tokens} tokens ({result.image_token_note()}, {result.cached_tokens} reused from cache)"
    )


def describe_pipeline(info: dict[str, Any]) -> str:
    """'model · device · precision' from `Pipeline.info()`."""
    name = str(info.get("name") or Path(str(info.get("model_dir", "?"))).name)
    weights = info.get("weights", {})
    weights = f"language {weights.get('language', '?')}, vision {weights.get('vision', '?')}"
    language = info.get("runtime", {}).get("language", {})
    compute = language.get("INFERENCE_PRECISION_HINT", "?")
    kv = language.get("KV_CACHE_PRECISION", "?")
    device = str(info.get("device", "?"))
    runs_on = language.get("EXECUTION_DEVICES", "")
    if runs_on and runs_on != device:  # e.g. AUTO -> CPU
        device += f" (runs on {runs_on})"
    return (
        f"**Model** `{name}` ({info.get('family', '?')}) · **device** {device} · "
        f"**precision** weights {weights}, compute {compute}, KV cache {kv}"
    )


@dataclass
class Prefill:
    """Progress of a long prompt, shown in the stats line."""

    done: int
    total: int


def _pump(state: TabState, chunks: Iterator, out: queue.Queue) -> None:
    """Worker thread: run the whole stream into a queue (so the conversation stays whole
    even when the page stops listening) and keep the result in the tab's state."""
    try:
        for chunk in chunks:
            state.last_result = chunk.result or state.last_result
            out.put(chunk)
    except BaseException as exc:  # handed to the page's generator, which reports it
        out.put(exc)
    finally:
        out.put(_END)


def _batches(chunks: queue.Queue, every_s: Callable[[], float]) -> Iterator[list]:
    """The worker's chunks in groups, at most one group per `every_s()` seconds."""
    done = False
    while not done:
        batch = [chunks.get()]
        deadline = time.monotonic() + every_s()
        while batch[-1] is not _END and (left := deadline - time.monotonic()) > 0:
            try:
                batch.append(chunks.get(timeout=left))
            except queue.Empty:
                break
        done = batch[-1] is _END
        if done:
            batch.pop()
        if batch:
            yield batch


def update_interval(chars: int) -> float:
    """Seconds between streamed updates of an answer of `chars` characters: the browser re-renders
    the whole answer on each update, so long answers update less often (bounded work per second)."""
    return min(MAX_UPDATE_S, max(MIN_UPDATE_S, chars / RENDER_CHARS_PER_S))


def _file_path(item: Any) -> str:
    """A MultimodalTextbox file entry (a path, or a dict with one) -> path."""
    return str(item.get("path") if isinstance(item, dict) else getattr(item, "path", item))


def _is_video(path: str) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _check_video(path: str, takes_video: bool) -> None:
    """A video the model can take and whose container passes the checks (nothing decoded yet)."""
    from llava_ov.runtime.video import open_video

    if not takes_video:
        raise _gradio().Error("this model takes no video (LLaVA-NeXT-Video and LLaVA-OneVision models do)", title="No video here")
    try:
        open_video(path).close()
    except LlavaOvError as exc:
        raise _gradio().Error(str(exc), title="Not a usable video") from None


def _check_image(path: str) -> None:
    from llava_ov.runtime.image import load_image

    try:
        load_image(path)
    except LlavaOvError as exc:
        raise _gradio().Error(str(exc), title="Not a usable image") from None


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    try:
        import gradio
    except ImportError:
        raise LlavaOvError("the chat page needs Gradio: pip install 'llava-ov[ui]'") from None
    return gradio


# ---------------------------------------------------------------- page


def build_demo(page: ChatPage):
    """The Gradio page wired to `page`'s handlers (not launched)."""
    gr = _gradio()
    with gr.Blocks(title="llava-ov chat", analytics_enabled=False) as demo:
        # a function, not the bound method: gradio deep-copies a State's value (and calls it if callable)
        state = gr.State(lambda: page.new_state(), delete_callback=TabState.close)
        gr.Markdown(page.header(), elem_id="header")
        chatbot = gr.Chatbot(elem_id="chat", label="Chat", height=480, buttons=["copy"])
        takes_video = page.pipe.model.family.takes_video
        box = gr.MultimodalTextbox(
            elem_id="message", file_types=["image", *sorted(VIDEO_EXTENSIONS)] if takes_video else ["image"],
            file_count="multiple",
            show_label=False, placeholder="Ask about an image or a video (attach one with the first message)…"
            if takes_video else "Ask about an image (attach one with the first message)…",
        )  # fmt: skip
        with gr.Row():
            stop = gr.Button("Stop", elem_id="stop", variant="stop")
            clear = gr.Button("New chat", elem_id="clear")
        stats = gr.Markdown(elem_id="stats")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            top = max(MAX_NEW_TOKENS_LIMIT, page.config.max_new_tokens)
            max_new = gr.Slider(1, top, value=page.config.max_new_tokens, step=1,
                                label="Max new tokens", elem_id="max-new-tokens")  # fmt: skip
            temperature = gr.Slider(0.0, 2.0, value=page.config.temperature, step=0.05,
                                    label="Temperature (0 = greedy)", elem_id="temperature")  # fmt: skip
            top_p = gr.Slider(0.05, 1.0, value=page.config.top_p, step=0.05, label="Top-p", elem_id="top-p")
            image_tokens = gr.Number(value=page.config.max_image_tokens or 0, precision=0, minimum=0,
                                     label="Max image tokens (0 = no limit; fewer = faster first answer)",
                                     elem_id="max-image-tokens")  # fmt: skip
            pruning = gr.Slider(0.0, 0.95, value=page.config.visual_token_pruning, step=0.05,
                                label="Visual-token pruning (share of image tokens dropped, CDPruner)",
                                elem_id="pruning")  # fmt: skip
        if page.examples():
            gr.Examples(page.examples(), inputs=[box], label="Examples")

        quick = dict(concurrency_limit=None, show_progress="hidden")  # instant handlers: never wait for the model
        # the chat is no output of add_message: a refused message then marks only the toast, not the chat
        accepted = box.submit(page.add_message, [box, state], [box, stats], **quick)
        shown = accepted.success(TabState.view, [state], [chatbot], **quick)
        answer = shown.success(
            page.respond, [state, max_new, temperature, top_p, image_tokens, pruning], [chatbot, stats],
            # as many answers at once as the engine runs (one on the stateful path); the rest wait in the queue
            concurrency_limit=page.pipe.max_concurrency, concurrency_id="model",
        )  # fmt: skip
        # no cancels=[answer]: a cancelled respond could not show the stopped answer's end, and its
        # last update could land after Stop's; the cancel Event stops the model, respond shows the rest
        stop.click(page.stop, [state], [chatbot, stats], **quick)
        for new_chat in (clear.click, chatbot.clear):  # the button, and the Chatbot's own trash icon
            new_chat(page.clear, [state], [chatbot, stats, box], **quick)
    return demo


def launch(demo, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True):
    """Serve the page; with block=False return once it listens (for tests).

    Gradio's own start-up lines are off (its "set `share=True` in `launch()`" hint names its API, not
    our --share flag); the page's addresses are printed here instead."""
    demo.queue(max_size=MAX_QUEUE)
    allowed = [str(EXAMPLES_DIR)] if EXAMPLES_DIR.is_dir() else []
    try:
        result = demo.launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=True,
            allowed_paths=allowed, quiet=True, max_file_size=MAX_UPLOAD_BYTES,
        )  # fmt: skip
    except OSError as exc:
        reason = str(exc).split(". ")[0]  # gradio's advice after the first sentence names its own API
        raise LlavaOvError(f"cannot serve the page on {host}:{port} ({reason}); choose another --port") from None
    if block:
        print(f"chat page: {demo.local_url}", flush=True)
        if share:
            print(f"public link: {demo.share_url}" if demo.share_url else "public link: could not be created "
                  "(no connection to gradio.live)", flush=True)  # fmt: skip
        demo.block_thread()
    return result


# ---------------------------------------------------------------- command line


def cmd_ui(args: argparse.Namespace) -> int:
    from llava_ov.frontends.args import generation_config, load_pipeline

    config = generation_config(args)
    config.validate()
    _gradio()  # before loading the model: a missing extra is said at once
    page = ChatPage(load_pipeline(args), config, system=args.system)
    launch(build_demo(page), args.host, args.port, args.share)
    return 0


def register(subparsers) -> None:
    """Add `llava-ov ui`."""
    from llava_ov.frontends.args import add_generation_args, add_model_args

    p = subparsers.add_parser("ui", help="chat about images in a web page (Gradio)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for the whole network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    p.add_argument("--system", default=None, help="system prompt")
    add_generation_args(p)
    p.set_defaults(func=cmd_ui)
