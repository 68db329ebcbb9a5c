"""`llava-ov chat`: an interactive terminal conversation over ChatSession.

Commands: `/image PATH` / `/video PATH` attach an image / a video to the next message, `/reset`
starts over, `/exit` (or Ctrl-D) quits; Ctrl-C stops the current answer.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from llava_ov.runtime.chat import ChatSession
from llava_ov.errors import LlavaOvError
from llava_ov.runtime.generate import GenerationConfig

HELP = "commands: /image PATH, /video PATH (attach to the next message), /reset, /exit"


def run_terminal_chat(
    pipeline, config: GenerationConfig, system: str | None = None,
    stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
) -> int:  # fmt: skip
    session = ChatSession(pipeline, system=system)
    pending: dict[str, list[str]] = {"image": [], "video": []}
    print(f"llava-ov chat — {HELP}", file=stdout)
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            print(file=stdout)
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if handle_command(line, session, pending, stdout):
                return 0
            continue
        answer_turn(session, line, pending, config, stdout)
        for attached in pending.values():
            attached.clear()


def handle_command(line: str, session: ChatSession, pending: dict[str, list[str]], out: TextIO) -> bool:
    """Run a slash command; True means exit."""
    cmd, _, arg = line.partition(" ")
    if cmd in ("/exit", "/quit"):
        return True
    if cmd == "/reset":
        session.reset()
        for attached in pending.values():
            attached.clear()
        print("(conversation cleared)", file=out)
    elif cmd in ("/image", "/video") and arg.strip():
        attach(cmd[1:], arg.strip(), session, pending, out)
    else:
        print(HELP, file=out)
    return False


def attach(kind: str, path: str, session: ChatSession, pending: dict[str, list[str]], out: TextIO) -> None:
    """Check an image or video now (a bad file is said at once) and keep it for the next message."""
    try:
        if kind == "image":
            from llava_ov.runtime.image import load_image

            load_image(path)
        else:
            from llava_ov.runtime.families import no_video
            from llava_ov.runtime.video import open_video

            family = session.pipeline.model.family
            if not family.takes_video:
                raise no_video(family.architecture)
            open_video(path).close()
        pending[kind].append(path)
        print(f"({kind} {path} will go with your next message)", file=out)
    except LlavaOvError as exc:
        print(f"error: {exc}", file=out)


def answer_turn(session: ChatSession, text: str, pending: dict[str, list[str]], config: GenerationConfig, out: TextIO) -> None:
    cancel = threading.Event()
    out.write("assistant> ")
    try:
        for chunk in session.stream(text, list(pending["image"]), config, cancel, videos=list(pending["video"])):
            out.write(chunk.text)
            out.flush()
    except KeyboardInterrupt:
        cancel.set()
        out.write(" [stopped]")
    except LlavaOvError as exc:
        out.write(f"\nerror: {exc}")
    out.write("\n")
