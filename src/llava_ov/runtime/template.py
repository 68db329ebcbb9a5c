"""The checkpoint's chat template, rendered without transformers.

Same Jinja environment as transformers' `apply_chat_template` (sandboxed,
trim_blocks, lstrip_blocks, `raise_exception`, the `{% generation %}` tag),
so a rendered prompt is byte-identical to the reference.
"""

from __future__ import annotations

import json
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


class ChatTemplate:
    """Renders a list of chat messages into the model's prompt text."""

    def __init__(self, source: str, tokens: dict[str, str] | None = None):
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise LlavaOvError(f"the chat template does not parse: {exc}") from None
        self.tokens = tokens or {}

    @classmethod
    def from_export(cls, export: ExportDir | Path) -> ChatTemplate:
        """The export's chat template and the special tokens it may use."""
        export = ExportDir.of(export)
        return cls(export.chat_template, export.special_tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)
        except jinja2.TemplateError as exc:
            raise LlavaOvError(f"chat template rejected the conversation: {exc}") from None
