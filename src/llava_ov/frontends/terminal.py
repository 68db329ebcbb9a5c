"""`llava-ov chat`: an interactive terminal conversation over ChatSession.

Commands: `/image PATH` attaches an image to the next message, `/reset`
starts over, `/exit` (or Ctrl-D) quits; Ctrl-C stops the current answer.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from llava_ov.runtime.chat import ChatSession
from llava_ov.errors import LlavaOvError
from llava_ov.runtime.generate import GenerationConfig

HELP = "commands: /image PATH (attach to next message), /reset, /exit"


def run_terminal_chat(
    pipeline, config: GenerationConfig, system: str | None = None,
    stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
) -> int:  # fmt: skip
    session = ChatSession(pipeline, system=system)
    pending_images: list[str] = []
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
            if handle_command(line, session, pending_images, stdout):
                return 0
            continue
        answer_turn(session, line, pending_images, config, stdout)
        pending_images.clear()


def handle_command(line: str, session: ChatSession, pending: list[str], out: TextIO) -> bool:
    """Run a slash command; True means exit."""
    cmd, _, arg = line.partition(" ")
    if cmd in ("/exit", "/quit"):
        return True
    if cmd == "/reset":
        session.reset()
        pending.clear()
        print("(conversation cleared)", file=out)
    elif cmd == "/image" and arg.strip():
        from llava_ov.runtime.image import load_image

        try:
            load_image(arg.strip())
            pending.append(arg.strip())
            print(f"(image {arg.strip()} will go with your next message)", file=out)
        except LlavaOvError as exc:
            print(f"error: {exc}", file=out)
    else:
        print(HELP, file=out)
    return False


def answer_turn(session: ChatSession, text: str, images: list[str], config: GenerationConfig, out: TextIO) -> None:
    cancel = threading.Event()
    out.write("assistant> ")
    try:
        for chunk in session.stream(text, list(images), config, cancel):
            out.write(chunk.text)
            out.flush()
    except KeyboardInterrupt:
        cancel.set()
        out.write(" [stopped]")
    except LlavaOvError as exc:
        out.write(f"\nerror: {exc}")
    out.write("\n")
