"""OpenAI's Responses API (`POST /v1/responses`), the stateless subset: `input` (text, or message items with
`input_text` / `input_image` parts, earlier `function_call` and `function_call_output` items), `instructions`,
function `tools` and `tool_choice`, `text.format` (json_schema / json_object), sampling fields, and streaming
as Responses events. A request becomes a chat-completions request (same checks, same engine); its answer
becomes a `response` object. `previous_response_id` and `store: true` need server-side state: refused (400).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field, ValidationError

from llava_ov.frontends.server.completions import ClientGone, Completion, _error_kwargs, _terminal_error
from llava_ov.frontends.server.errors import APIError, error_body
from llava_ov.frontends.server.mapping import CallGate, tool_calls_out, usage
from llava_ov.frontends.server.schemas import ChatCompletionRequest, _Lenient
from llava_ov.runtime.pipeline import StreamChunk


class ResponsesRequest(_Lenient):
    model: str = ""
    input: str | list[dict[str, Any]] = Field(description="a text, or a list of input items")
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    text: dict[str, Any] | None = None
    stream: bool | None = False
    previous_response_id: str | None = None
    store: bool | None = None


PARTS = {"input_text": "text", "output_text": "text", "input_image": "image_url"}


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat-completions request a Responses request stands for (400 for what needs server state)."""
    if req.previous_response_id is not None or req.store:
        raise APIError(400, "this server keeps no responses: send the whole conversation (no previous_response_id, "
                       "store: false)", param="previous_response_id" if req.previous_response_id else "store")  # fmt: skip
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for item in items:
        _add_item(messages, item)
    body: dict[str, Any] = {
        "model": req.model, "messages": messages, "max_tokens": req.max_output_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "seed": req.seed, "parallel_tool_calls": req.parallel_tool_calls,
        "tools": [_chat_tool(t) for t in req.tools] if req.tools else None, "tool_choice": _chat_choice(req.tool_choice),
        "response_format": _chat_format((req.text or {}).get("format")),
    }  # fmt: skip
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise APIError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", param="input") from None


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any]) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        content = item.get("content")
        if isinstance(content, list):
            content = [_chat_part(part) for part in content]
        messages.append({"role": item.get("role", "user"), "content": content})
    elif kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}  # fmt: skip
        if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
            messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": output if isinstance(output, str) else json.dumps(output)})  # fmt: skip
    else:
        raise APIError(400, f"input items of type {kind!r} are not supported here", param="input")


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = PARTS.get(part.get("type", ""))
    if kind == "text":
        return {"type": "text", "text": part.get("text", "")}
    if kind == "image_url":
        return {"type": "image_url", "image_url": {"url": part.get("image_url") or part.get("file_id") or ""}}
    raise APIError(400, f"content parts of type {part.get('type')!r} are not supported here", param="input")


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise APIError(400, f"tools of type {tool.get('type')!r} are not supported here (functions are)", param="tools")
    keys = ("name", "description", "parameters", "strict")
    return {"type": "function", "function": {k: tool[k] for k in keys if tool.get(k) is not None}}


def _chat_choice(choice: str | dict[str, Any] | None) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _chat_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return fmt


# ----------------------------------------------------------------------------- the answer


class ResponseBuilder:
    """Response objects and events of one request."""

    def __init__(self, req: ResponsesRequest, model: str):
        self.req = req
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.sequence = 0

    def response(self, status: str, output: list[dict[str, Any]], result: Any = None) -> dict[str, Any]:
        out = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": output, "instructions": self.req.instructions, "tools": self.req.tools or [],
            "tool_choice": self.req.tool_choice or "auto", "parallel_tool_calls": self.req.parallel_tool_calls is not False,
            "temperature": self.req.temperature, "top_p": self.req.top_p, "max_output_tokens": self.req.max_output_tokens,
            "previous_response_id": None, "error": None, "metadata": {}, "text": self.req.text or {"format": {"type": "text"}},
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None, "usage": None,
        }  # fmt: skip
        if result is not None:
            chat = usage(result)
            out["usage"] = {
                "input_tokens": chat["prompt_tokens"], "output_tokens": chat["completion_tokens"],
                "total_tokens": chat["total_tokens"], "input_tokens_details": chat["prompt_tokens_details"],
                "output_tokens_details": {"reasoning_tokens": 0},
            }  # fmt: skip
        return out

    def output(self, result: Any, calls_tools: bool) -> list[dict[str, Any]]:
        calls = tool_calls_out(result) if calls_tools else None
        if calls:
            return [self.call_item(call) for call in calls]
        return [self.message_item(result.text, "completed")]

    def message_item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def call_item(call: dict[str, Any]) -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{call['id'][5:]}", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}  # fmt: skip

    def status(self, result: Any) -> str:
        return "incomplete" if result.finish_reason in ("length", "cancelled") else "completed"

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: ".encode() + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def collect(completion: Completion, first: StreamChunk, builder: ResponseBuilder) -> dict[str, Any]:
    """The whole answer as a `response` object."""
    try:
        event = first
        while event.result is None:
            event = await completion.output.next()
            if not isinstance(event, StreamChunk):
                raise _terminal_error(event)
    finally:
        completion.close()
    result = event.result
    return builder.response(builder.status(result), builder.output(result, completion.job.calls_tools), result)


async def events(completion: Completion, first: StreamChunk, builder: ResponseBuilder) -> AsyncIterator[bytes]:
    """Responses streaming events: created, the message's text deltas (or the function calls), completed."""
    gate = CallGate(completion.job.calls_tools)
    text = ""
    opened = False
    try:
        yield builder.event("response.created", response=builder.response("in_progress", []))
        yield builder.event("response.in_progress", response=builder.response("in_progress", []))
        event: Any = first
        while True:
            if not isinstance(event, StreamChunk):
                if not isinstance(event, ClientGone):
                    err = _terminal_error(event)
                    yield builder.event("error", **error_body(**_error_kwargs(err))["error"])
                break
            piece = gate.feed(event.text)
            if piece:
                if not opened:
                    opened = True
                    yield builder.event("response.output_item.added", output_index=0, item=builder.message_item(None, "in_progress"))
                    yield builder.event("response.content_part.added", item_id=builder.message_id, output_index=0,
                                        content_index=0, part={"type": "output_text", "text": "", "annotations": []})  # fmt: skip
                text += piece
                yield builder.event("response.output_text.delta", item_id=builder.message_id, output_index=0,
                                    content_index=0, delta=piece)  # fmt: skip
            if event.result is not None:
                if gate.held:  # held as a call but cut by max_output_tokens: the answer is its text
                    text = gate.held
                async for done in _finish(builder, event.result, completion.job.calls_tools, opened, text):
                    yield done
                break
            event = await completion.output.next()
    finally:
        completion.close()


async def _finish(builder: ResponseBuilder, result: Any, calls_tools: bool, opened: bool, text: str) -> AsyncIterator[bytes]:
    output = builder.output(result, calls_tools)
    if output[0]["type"] == "function_call":
        for index, item in enumerate(output):
            yield builder.event("response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"})
            yield builder.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=item["arguments"])
            yield builder.event("response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=item["arguments"])
            yield builder.event("response.output_item.done", output_index=index, item=item)
    else:
        if not opened:
            yield builder.event("response.output_item.added", output_index=0, item=builder.message_item(None, "in_progress"))
            yield builder.event("response.content_part.added", item_id=builder.message_id, output_index=0,
                                content_index=0, part={"type": "output_text", "text": "", "annotations": []})  # fmt: skip
        part = {"type": "output_text", "text": text, "annotations": []}
        yield builder.event("response.output_text.done", item_id=builder.message_id, output_index=0, content_index=0, text=text)
        yield builder.event("response.content_part.done", item_id=builder.message_id, output_index=0, content_index=0, part=part)
        yield builder.event("response.output_item.done", output_index=0, item=builder.message_item(text, "completed"))
    status = builder.status(result)
    kind = "response.completed" if status == "completed" else "response.incomplete"
    yield builder.event(kind, response=builder.response(status, output, result))


__all__ = ["ResponsesRequest", "ResponseBuilder", "to_chat", "collect", "events"]
