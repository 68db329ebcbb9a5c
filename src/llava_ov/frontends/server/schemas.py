"""Pydantic models of the OpenAI chat-completions API subset this server speaks.

Requests accept (and ignore) OpenAI fields that do not change a greedy or
sampled answer here (e.g. `user`, `metadata`); values the server cannot honour
are checked in `mapping`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from llava_ov.runtime.pipeline import MAX_ANSWERS

MAX_STOP = 16


class _Lenient(BaseModel):
    """Unknown fields are ignored; known ones are strict (no "1" -> 1 or 0.0 -> false coercion)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class ImageURL(_Lenient):
    url: str = Field(description="data:image/...;base64,... or http(s) URL (file paths only when enabled)")
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Lenient):
    url: str = Field(description="data:video/...;base64,... or http(s) URL (file paths only when enabled)")


class VideoPart(_Lenient):
    """A video (vLLM's `video_url` part): LLaVA-NeXT-Video models."""

    type: Literal["video_url"]
    video_url: VideoURL


MAX_FRAME_URLS = 64


class VideoFramesPart(_Lenient):
    """A video given as its frames, each an image URL, or as one video URL (transformers' `video` part)."""

    type: Literal["video"]
    video: str | Annotated[list[str], Field(min_length=1, max_length=MAX_FRAME_URLS)]


ContentPart = Annotated[Union[TextPart, ImagePart, VideoPart, VideoFramesPart], Field(discriminator="type")]


class CalledFunction(_Lenient):
    name: str
    arguments: str = Field(description="the arguments as a JSON string")


class ToolCallIn(_Lenient):
    """An assistant's earlier tool call, sent back in the conversation."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, description="an assistant's calls")
    tool_call_id: str | None = Field(default=None, description="a tool message: the call it answers")


class ToolFunction(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Lenient):
    type: Literal["function"]
    function: ToolFunction


class FunctionName(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: FunctionName


MAX_MESSAGES = 1024  # a conversation longer than this cannot fit any LLaVA context anyway


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class TextFormat(_Lenient):
    type: Literal["text"]


class JsonObjectFormat(_Lenient):
    type: Literal["json_object"]


class JsonSchemaSpec(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # omitted: any JSON object
    strict: bool | None = None


class JsonSchemaFormat(_Lenient):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class RegexFormat(_Lenient):
    type: Literal["regex"]
    regex: str = Field(min_length=1, description="the whole answer matches this regular expression")


class GrammarFormat(_Lenient):
    type: Literal["grammar"]
    grammar: str = Field(min_length=1, description="a Lark grammar (llguidance's dialect) the answer follows")


ResponseFormat = Annotated[
    Union[TextFormat, JsonObjectFormat, JsonSchemaFormat, RegexFormat, GrammarFormat], Field(discriminator="type")
]


class ChatCompletionRequest(_Lenient):
    model: str = Field(default="", description="any name: this server serves one model")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 or omitted: greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, description="extension: 0 = off")
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10, description="extension")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    min_p: float | None = Field(default=None, ge=0, le=1, description="extension (vLLM's): 0 = off")
    logit_bias: dict[str, float] | None = Field(default=None, description="token id -> bias in [-100, 100]")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_ANSWERS, description="answers (choices) to the prompt: one prefill")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = Field(default=None, description="text, json_object, json_schema, regex or grammar")
    guided_regex: str | None = Field(default=None, description="vLLM's name: as response_format regex")
    guided_grammar: str | None = Field(default=None, description="vLLM's name: as response_format grammar (Lark)")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="needs logprobs: true")
    max_image_tokens: int | None = Field(default=None, ge=1, description="extension: image-token budget")
    visual_token_pruning: float | None = Field(default=None, ge=0, le=0.99, description="extension: CDPruner ratio")
    prompt_lookup: int | None = Field(default=None, ge=0, le=16,
                                      description="extension: tokens proposed per step by prompt lookup (0: off)")
    jump_forward: bool | None = Field(default=None, description="extension: propose the tokens a grammar forces (default on)")
    use_draft: bool | None = Field(default=None, description="extension: let the server's --draft model propose (default on)")
    num_frames: int | None = Field(default=None, ge=1, le=256, description="extension: frames sampled from each video")
    video_fps: float | None = Field(default=None, gt=0, le=60, description="extension: or frames per second of video")
    tools: list[ToolDef] | None = Field(default=None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI fields that would change the answer and that this server cannot honour: 400 naming the field
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = Field(default=None, description="deprecated by OpenAI: use tools")
    function_call: Any = Field(default=None, description="deprecated by OpenAI: use tool_choice")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(default=0, description="prompt tokens reused from the prefix KV cache (not prefilled)")


class CompletionTokensDetails(BaseModel):
    accepted_prediction_tokens: int = Field(default=0, description="proposed tokens kept (jump-forward, prompt lookup)")
    rejected_prediction_tokens: int = Field(default=0, description="proposed tokens dropped")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)
    image_tokens: int = Field(default=0, description="extension: image tokens in the prompt (kept)")
    image_tokens_total: int = Field(default=0, description="extension: before the image-token budget and pruning")
    video_tokens: int = Field(default=0, description="extension: video tokens in the prompt")
    video_frames: int = Field(default=0, description="extension: frames sampled from the prompt's videos")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class Logprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: Logprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: Logprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed answer (`data: {...}`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llava-ov"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
