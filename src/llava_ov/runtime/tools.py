"""Tool (function) calling: the form a call takes in the answer, the grammar that makes every call valid, and
how tools, calls and their results are written into a prompt.

A call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes' and Qwen2.5's form), one per
call, back to back. Answers are decoded under a Lark grammar (llguidance) whose calls are `%json` objects
built from each function's parameter schema, so every call names a given function and its arguments validate,
whatever the model was trained on. `required` (or one named function): the answer is calls; `auto`: calls, or
text that does not begin with `<`.

The llava-hf chat templates have no tool support, so tools are written generically: the first user message
opens with `tools_preamble` (what may be called and how), an assistant's earlier calls are written back in the
call form, and a tool's result becomes a user turn `<tool_response>...</tool_response>`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llava_ov.errors import LlavaOvError
from llava_ov.runtime.constrained import check_schema

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit
COMPACT = {"whitespace_flexible": False}  # llguidance: no free whitespace inside a call's JSON
CALLS = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None  # JSON Schema of the arguments (None: any object)

    def call_schema(self) -> dict[str, Any]:
        """The JSON of one call of this function, as a schema."""
        arguments = self.parameters if self.parameters is not None else {"type": "object"}
        return {
            "x-guidance": COMPACT, "type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": self.name}, "arguments": arguments},
        }  # fmt: skip


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"


def check_tools(tools: list[Tool]) -> None:
    """Names valid and distinct, parameter schemas usable (LlavaOvError naming the first problem)."""
    if not 1 <= len(tools) <= MAX_TOOLS:
        raise LlavaOvError(f"between 1 and {MAX_TOOLS} tools, not {len(tools)}")
    seen = set()
    for tool in tools:
        if not NAME.match(tool.name):
            raise LlavaOvError(f"tool name {tool.name!r}: letters, digits, _ and - only, at most 64")
        if tool.name in seen:
            raise LlavaOvError(f"tool name {tool.name!r} is given twice")
        seen.add(tool.name)
        if tool.parameters is not None:
            check_schema(tool.parameters)


def tool_grammar(tools: list[Tool], required: bool, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) of an answer that calls `tools`: only calls when `required`,
    else calls or text; several calls when `parallel`."""
    bodies = [f"body{i}: %json {json.dumps(tool.call_schema())}" for i, tool in enumerate(tools)]
    alternatives = " | ".join(f"body{i}" for i in range(len(tools)))
    rules = [
        "start: calls" if required else "start: calls | TEXT",
        f"calls: call{'+' if parallel else ''}",
        f'call: "{CALL_OPEN}" ({alternatives}) "{CALL_CLOSE}"',
        *bodies,
    ]
    if not required:
        rules.append(r"TEXT: /[^<][\s\S]*/")
    return "\n".join(rules) + "\n"


def tools_preamble(tools: list[Tool]) -> str:
    """What the model is told about the tools (opening the first user message)."""
    listed = [{"name": t.name, "description": t.description, "parameters": t.parameters or {"type": "object"}}
              for t in tools]  # fmt: skip
    return (
        "You can call these functions:\n" + json.dumps(listed, ensure_ascii=False) + "\n"
        f'To call one, answer only with {CALL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}'
        f"{CALL_CLOSE} (several in a row for several calls); their results come back as {RESULT_OPEN}...{RESULT_CLOSE}.\n\n"
    )


def render_call(name: str, arguments: str | dict[str, Any]) -> str:
    """An earlier call, written back into the conversation in the call form."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return CALL_OPEN + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + CALL_CLOSE


def render_result(content: str) -> str:
    """A tool's result as the text of a user turn."""
    return f"{RESULT_OPEN}\n{content}\n{RESULT_CLOSE}"


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls of a finished answer (None when it is text). The grammar made each call's JSON valid."""
    if not text.startswith(CALL_OPEN):
        return None
    calls = []
    for body in CALLS.findall(text):
        call = json.loads(body)
        calls.append(ToolCall(call["name"], call["arguments"]))
    return calls or None
