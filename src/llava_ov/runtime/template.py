"""The checkpoint's chat template, rendered without transformers.

Same Jinja environment as transformers' `apply_chat_template` (sandboxed,
trim_blocks, lstrip_blocks, `raise_exception`, the `{% generation %}` tag),
so a rendered prompt is byte-identical to the reference.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llava_ov.errors import LlavaOvError
from llava_ov.runtime.export import ExportDir


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks it; we need not)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


TURN_MARK = "\x00answer\x00"  # stands for an assistant's text when finding what the template writes after it


class ChatTemplate:
    """Renders a list of chat messages into the model's prompt text."""

    def __init__(self, source: str, tokens: dict[str, str] | None = None):
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise LlavaOvError(f"the chat template does not parse: {exc}") from None
        self.tokens = tokens or {}
        self.supports_tools = bool(re.search(r"\btools\b", source))  # renders function definitions itself

    @classmethod
    def from_export(cls, export: ExportDir | Path) -> ChatTemplate:
        """The export's chat template and the special tokens it may use."""
        export = ExportDir.of(export)
        return cls(export.chat_template, export.special_tokens)

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None
    ) -> str:
        try:
            extra = {"tools": tools} if tools else {}
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens, **extra)
        except jinja2.TemplateError as exc:
            raise LlavaOvError(f"chat template rejected the conversation: {exc}") from None

    def turn_end(self, specials: dict[str, int]) -> int | None:
        """The special token the template writes right after an assistant's text (ChatML's <|im_end|>,
        Llama-3's <|eot_id|>, Mistral's </s>): a generated answer ends there, as at eos."""
        chat = [{"role": "user", "content": [{"type": "text", "text": "?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": TURN_MARK}]}]  # fmt: skip
        try:
            after = self.render(chat, add_generation_prompt=False).partition(TURN_MARK)[2]
        except LlavaOvError:
            return None
        found = [token for token in specials if after.startswith(token)]
        return specials[max(found, key=len)] if found else None
