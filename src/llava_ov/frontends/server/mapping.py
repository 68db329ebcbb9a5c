"""OpenAI request fields -> llava_ov `Message`s and `GenerationConfig`; runtime errors -> API errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from llava_ov.runtime.constrained import JSON_OBJECT, InvalidGrammarError, InvalidSchemaError
from llava_ov.errors import ContextLengthError, InvalidImageError, LlavaOvError
from llava_ov.runtime.generate import GenerationConfig, TokenLogprob
from llava_ov.runtime.pipeline import Message
from llava_ov.frontends.server.errors import APIError
from llava_ov.frontends.server.images import ImageLoader
from llava_ov.frontends.server.schemas import (
    ChatCompletionRequest, ChatMessage, ImagePart, NamedToolChoice, TextPart, VideoFramesPart, VideoPart,
)  # fmt: skip
from llava_ov.runtime.tools import Tool, check_tools, parse_tool_calls, render_call, render_result, tool_grammar, tools_preamble
from llava_ov.frontends.server.settings import ServerSettings
from llava_ov.frontends.server.videos import VideoLoader
from llava_ov.runtime.video import InvalidVideoError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "user"}
# runtime finish reason -> OpenAI's; "cancelled" only reaches a client when the request timeout cut the answer,
# which, like max_tokens, is a length limit
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "length"}


UNSUPPORTED = {  # field -> why (a 400 names it)
    "audio": "audio output is not supported", "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported", "functions": "use tools (functions is deprecated)",
    "function_call": "use tool_choice (function_call is deprecated)",
}


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """400 naming the first field set to something this server cannot do (modalities other than text, audio, ...)."""
    for field, why in UNSUPPORTED.items():
        if getattr(req, field) is not None:
            raise APIError(400, f"{field}: {why}", param=field, code="unsupported_value")
    if req.modalities is not None and set(req.modalities) - {"text"}:
        raise APIError(400, "modalities: only text output is supported", param="modalities", code="unsupported_value")


def generation_config(req: ChatCompletionRequest, settings: ServerSettings, native_tools: bool = False) -> GenerationConfig:
    """Sampling settings of a request, within the server's max-tokens cap (400 for what we cannot do).
    `native_tools`: the chat template renders tools, so the config carries their definitions."""
    refuse_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    wanted = req.max_completion_tokens or req.max_tokens or settings.max_tokens
    config = GenerationConfig(
        max_new_tokens=min(wanted, settings.max_tokens),  # a larger request is capped, not refused (like context)
        temperature=req.temperature or 0.0,  # omitted: greedy, like the rest of llava-ov
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        min_p=req.min_p or 0.0,
        logit_bias=logit_bias(req.logit_bias),
        seed=req.seed,
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        json_schema=json_schema(req),
        **grammar_fields(req),
        **tool_fields(req, native_tools),
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        max_image_tokens=req.max_image_tokens or settings.max_image_tokens,
        visual_token_pruning=settings.visual_token_pruning if req.visual_token_pruning is None
        else req.visual_token_pruning,
        num_frames=req.num_frames or (settings.num_frames if req.video_fps is None else None),
        video_fps=req.video_fps,
        prompt_lookup=settings.prompt_lookup if req.prompt_lookup is None else req.prompt_lookup,
        jump_forward=req.jump_forward is not False,
        use_draft=req.use_draft is not False,
    )
    try:
        config.validate()
    except InvalidGrammarError as exc:
        raise schema_error(exc) from None
    except LlavaOvError as exc:
        raise APIError(400, str(exc), code="invalid_value") from None
    return config


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as JSON object keys) with integer ids (400 for a key that is not one)."""
    if not bias:
        return None
    try:
        return {int(token): float(value) for token, value in bias.items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias",
                       code="invalid_value") from None  # fmt: skip


def offered_tools(req: ChatCompletionRequest) -> tuple[list[Tool], bool]:
    """The tools the answer may call (none with tool_choice "none", only the named one for a named choice)
    and whether it must call: the request's tool mode (400 for a bad tool or a choice naming none of them)."""
    if not req.tools or req.tool_choice == "none":
        return [], False
    tools = [Tool(t.function.name, t.function.description or "", t.function.parameters) for t in req.tools]
    try:
        check_tools(tools)
    except InvalidSchemaError as exc:
        raise APIError(400, f"a tool's parameters cannot be used: {exc}", param="tools", code="invalid_json_schema") from None
    except LlavaOvError as exc:
        raise APIError(400, str(exc), param="tools", code="invalid_value") from None
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.name == choice.function.name]
        if not named:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice")
        return named, True
    return tools, choice == "required"


def tool_fields(req: ChatCompletionRequest, native: bool = False) -> dict[str, Any]:
    """The grammar of an answer that may (auto) or must (required, named) call the offered tools (and,
    for a template that renders tools, their definitions)."""
    tools, required = offered_tools(req)
    if not tools:
        return {}
    fmt = req.response_format
    if (fmt is not None and fmt.type != "text") or req.guided_regex or req.guided_grammar:
        raise APIError(400, "tools and a constrained response_format exclude each other", param="response_format")
    fields: dict[str, Any] = {"grammar": tool_grammar(tools, required, parallel=req.parallel_tool_calls is not False)}
    if native:
        fields["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                              "parameters": t.parameters or {"type": "object"}}}
                           for t in tools]  # fmt: skip
    return fields


def grammar_fields(req: ChatCompletionRequest) -> dict[str, str]:
    """The regex or Lark grammar a request asks for: response_format's, or vLLM's guided_regex/guided_grammar."""
    fmt = req.response_format
    fields = {"regex": req.guided_regex, "grammar": req.guided_grammar}
    if fmt is not None and fmt.type in ("regex", "grammar"):
        if fields[fmt.type] is not None:
            raise APIError(400, f"{fmt.type} given twice (response_format and guided_{fmt.type})", param="response_format")
        fields[fmt.type] = getattr(fmt, fmt.type)
    given = {k: v for k, v in fields.items() if v is not None}
    if given and fmt is not None and fmt.type in ("json_object", "json_schema"):
        raise APIError(400, f"response_format {fmt.type} and a {next(iter(given))} exclude each other", param="response_format")
    return given


def json_schema(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """The schema `response_format` asks for (None for text, regex, grammar); json_object is any JSON object."""
    fmt = req.response_format
    if fmt is None or fmt.type in ("text", "regex", "grammar"):
        return None
    if fmt.type == "json_object":
        return dict(JSON_OBJECT)
    return fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else dict(JSON_OBJECT)


def schema_error(exc: InvalidGrammarError, param: str = "response_format") -> APIError:
    code = "invalid_json_schema" if isinstance(exc, InvalidSchemaError) else "invalid_grammar"
    return APIError(400, str(exc), param=param, code=code)


def logprobs_content(entries: list[TokenLogprob] | None, token_bytes: Callable[[int], bytes]) -> list[dict[str, Any]]:
    """Runtime logprobs as OpenAI's `logprobs.content` list."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries or []]


async def to_messages(
    req: ChatCompletionRequest, settings: ServerSettings, images: ImageLoader, videos: VideoLoader,
    takes_video: bool = True, native_tools: bool = False,
) -> list[Message]:  # fmt: skip
    """The conversation as runtime messages, every image and video fetched and checked (400 on a bad one).
    Tool calls and results are the template's to render when it renders tools (`native_tools`), else
    written in tools.py's generic form."""
    parts = [p for m in req.messages if isinstance(m.content, list) for p in m.content]
    count = sum(isinstance(p, ImagePart) for p in parts)
    if count > settings.max_images:
        raise APIError(400, f"{count} images in one request; the limit is {settings.max_images}", param="messages")
    count = sum(isinstance(p, (VideoPart, VideoFramesPart)) for p in parts)
    if count and not takes_video:
        raise APIError(400, "this model takes no video (LLaVA-NeXT-Video and LLaVA-OneVision models do); send frames as images",
                       param="messages", code="invalid_video")  # fmt: skip
    if count > settings.max_videos:
        raise APIError(400, f"{count} videos in one request; the limit is {settings.max_videos}", param="messages")
    tally = PixelTally(settings.max_request_pixels)
    messages = [await _to_message(i, m, images, videos, tally, native_tools) for i, m in enumerate(req.messages)]
    tools, _ = offered_tools(req)
    first_user = next((m for m in messages if m.role == "user"), None)
    if tools and first_user is not None and not native_tools:  # a template without tools: the user is told
        first_user.text = tools_preamble(tools) + first_user.text
    return messages


class PixelTally:
    """The declared pixels of a request's images so far, refused past `limit` before any image is decoded."""

    def __init__(self, limit: int):
        self.limit, self.total = limit, 0

    def add(self, pixels: int) -> None:
        self.total += pixels
        if self.total > self.limit:
            raise InvalidImageError(
                f"the request's images declare {self.total:,} pixels or more; all images of a request may "
                f"declare at most {self.limit:,} (fewer or smaller images)"
            )


async def _to_message(
    index: int, msg: ChatMessage, images: ImageLoader, videos: VideoLoader, tally: PixelTally, native_tools: bool = False
) -> Message:
    if msg.role == "tool":
        if native_tools:
            return Message("tool", _text_of(msg), tool_call_id=msg.tool_call_id)
        return Message("user", render_result(_text_of(msg)))
    if msg.tool_calls:
        calls = [(c.function.name, _arguments(c, index)) for c in msg.tool_calls]
        if native_tools:
            return Message("assistant", _text_of(msg), tool_calls=[{"name": n, "arguments": a} for n, a in calls])
        return Message("assistant", _text_of(msg) + "".join(render_call(n, a) for n, a in calls))
    if msg.content is None or isinstance(msg.content, str):
        return Message(ROLES[msg.role], msg.content or "")
    message = Message(ROLES[msg.role])
    texts = []
    for j, part in enumerate(msg.content):
        param = f"messages[{index}].content[{j}].{part.type}"
        try:
            if isinstance(part, ImagePart):
                data, pixels = await images.load_counted(part.image_url.url)
                tally.add(pixels)
                message.images.append(data)
            elif isinstance(part, VideoPart):
                message.videos.append(await videos.load(part.video_url.url))
            elif isinstance(part, VideoFramesPart) and isinstance(part.video, str):
                message.videos.append(await videos.load(part.video))
            elif isinstance(part, VideoFramesPart):
                message.videos.append(await videos.frames(part.video, images))
            else:
                texts.append(part.text)
        except InvalidImageError as exc:
            raise APIError(400, str(exc), param=param, code="invalid_image") from None
        except InvalidVideoError as exc:
            raise APIError(400, str(exc), param=param, code="invalid_video") from None
    message.text = "\n".join(texts)
    return message


def _text_of(msg: ChatMessage) -> str:
    if isinstance(msg.content, list):
        return "\n".join(p.text for p in msg.content if isinstance(p, TextPart))
    return msg.content or ""


def _arguments(call: Any, index: int) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise APIError(400, "a tool call's arguments must be a JSON object (as a string)",
                       param=f"messages[{index}].tool_calls", code="invalid_value")  # fmt: skip
    return arguments


def tool_calls_out(result: Any) -> list[dict[str, Any]] | None:
    """A finished answer's complete calls in OpenAI's form (None when it is text, or was cut by `max_tokens`
    before its first call ended: then it is the text so far, finish_reason "length")."""
    calls = parse_tool_calls(result.text)
    if calls is None:
        return None
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in calls]  # fmt: skip


class CallGate:
    """Streaming with tools offered: an answer's text is held until its start shows a call (`<`: the grammar
    lets text begin with anything else) or text, which then streams as usual. Without tools it passes all."""

    def __init__(self, active: bool):
        self.held: str | None = "" if active else None  # None: streaming text

    @property
    def holding(self) -> bool:
        return self.held is not None

    def feed(self, text: str) -> str:
        """What of the answer can be sent now ("" while it may still be a call)."""
        if self.held is None:
            return text
        self.held += text
        if self.held and not self.held.startswith("<"):
            text, self.held = self.held, None
            return text
        return ""


def tool_finish_reason(result: Any) -> str:
    """finish_reason of an answer that made calls: "tool_calls", or "length" when max_tokens cut what followed."""
    return "tool_calls" if result.finish_reason in ("eos", "stop") else FINISH_REASONS[result.finish_reason]


def api_error(exc: BaseException) -> APIError:
    """A runtime exception as the error the client sees (no traces, no paths for unexpected ones)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, InvalidImageError):
        return APIError(400, str(exc), param="messages", code="invalid_image")
    if isinstance(exc, InvalidVideoError):
        return APIError(400, str(exc), param="messages", code="invalid_video")
    if isinstance(exc, InvalidGrammarError):
        return schema_error(exc)
    if isinstance(exc, LlavaOvError):
        return APIError(400, str(exc), code="invalid_request")
    return APIError(500, "internal server error while generating (see the server log)", code="internal_error")


def usage(*results: Any) -> dict[str, Any]:
    """Usage of one prompt's answers: the prompt counted once (the first answer's cache hits), every answer's tokens."""
    result = results[0]
    prompt, completion = result.prompt_tokens, sum(len(r.token_ids) for r in results)
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},  # reused from the prefix KV cache
        "completion_tokens_details": {  # OpenAI's names (Predicted Outputs): proposed tokens kept and dropped
            "accepted_prediction_tokens": sum(r.accepted_tokens for r in results),
            "rejected_prediction_tokens": sum(r.proposed_tokens - r.accepted_tokens for r in results),
        },
        "image_tokens": result.image_tokens, "image_tokens_total": result.image_tokens_total,
        "video_tokens": result.video_tokens, "video_frames": result.video_frames,
    }  # fmt: skip
