"""Prompt preparation: chat messages -> a `PreparedPrompt` a backend can run.

Render the chat template, tokenize, plan each image (load, resolution within the
image-token budget, feature-cache lookup), check the length against the backend's
limits before any vision work, encode the images that are new, prune their tokens when
asked, and lay the prompt out (token ids, cache keys, position ids).

Thread-safe without a global lock: the tokenizer guards its own infer request, the vision
encoder hands out one of a few infer requests (runtime/model.py), and the feature cache
locks only around lookups and inserts (runtime/feature_cache.py). Concurrent requests
encode their images at the same time; the same new image requested twice is encoded once.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from PIL import Image

from llava_ov.errors import ContextLengthError, LlavaOvError
from llava_ov.runtime.budget import Resolution, fit_budget
from llava_ov.runtime.feature_cache import FeatureCache
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.image import declared_size, load_image, source_bytes
from llava_ov.runtime.model import ExportedModel
from llava_ov.runtime.pruning import kept_count, select_tokens
from llava_ov.runtime.template import ChatTemplate
from llava_ov.runtime.families import no_video
from llava_ov.runtime.video import Video, VideoCancelled, VideoLimits, open_video, sample_indices

Cancel = Callable[[], bool] | None  # true when the request was cancelled

FEATURE_CACHE_SIZE = 16
FEATURE_CACHE_BYTES = 1 << 30  # 16 LLaVA-NeXT images at 7B width are 0.75 GB; a 32-frame video is 75 MB
FRAME_CACHE_SIZE = 64  # per-frame video features (2.4 MB each at 144 x 4096 f32): another sampling reuses them
FRAMES_PER_ENCODE = 8  # frames preprocessed and encoded at once: bounded memory, cancellable between batches
ANSWER_ROOM = 512  # tokens kept for the answer when default-length videos are shortened to fit the context
# Prompts that hold decoded images at once (loading, preprocessing, encoding), per vision request:
# memory stays bounded however many requests arrive, and loading overlaps encoding.
PREPARATIONS_PER_VISION_REQUEST = 2


@dataclass
class Message:
    """One chat turn: role ("system" | "user" | "assistant"), text, and the images and videos it carries."""

    role: str
    text: str = ""
    images: list[Any] = field(default_factory=list)  # paths, bytes, PIL images or arrays
    videos: list[Any] = field(default_factory=list)  # video files, their bytes, or lists of frames
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls: [{"name": ..., "arguments": {...}}]
    tool_call_id: str | None = None  # role "tool": the call this result answers

    def for_template(self) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": self.text}]
        content += [{"type": "image"} for _ in self.images]
        content += [{"type": "video"} for _ in self.videos]
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.tool_calls:  # as transformers' chat templates take them
            message["tool_calls"] = [{"type": "function", "function": call} for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


@dataclass
class PreparedImage:
    key: int  # negative id standing for this image's positions in the cache keys
    features: np.ndarray  # [tokens, hidden]
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    full_tokens: int = 0  # tokens at the model's own resolution, before any budget or pruning
    kept: np.ndarray | None = None  # pruned: which of the resolution's packed tokens these features are
    packed_tokens: int = 0  # tokens at the chosen resolution, before pruning
    prune_s: float = 0.0
    kind: str = "image"  # "image" | "video"
    frames: int = 0  # a video's sampled frames

    def __post_init__(self) -> None:
        self.full_tokens = self.full_tokens or len(self.features)
        self.packed_tokens = self.packed_tokens or len(self.features)


@dataclass
class PreparedPrompt:
    token_ids: np.ndarray  # expanded: every image position holds the image token id
    keys: np.ndarray  # token id, or the image's key at image positions
    images: list[PreparedImage]
    positions: np.ndarray | None = None  # position ids when pruned tokens left gaps (else 0..n-1)

    @property
    def visual_tokens(self) -> int:
        """Tokens of the prompt's images and videos (the kept ones)."""
        return sum(len(im.features) for im in self.images)

    @property
    def image_tokens(self) -> int:
        return sum(len(im.features) for im in self.images if im.kind == "image")

    @property
    def video_tokens(self) -> int:
        return sum(len(im.features) for im in self.images if im.kind == "video")

    @property
    def video_frames(self) -> int:
        return sum(im.frames for im in self.images if im.kind == "video")

    @property
    def image_tokens_total(self) -> int:
        """Image tokens the model's own resolution would make, without a budget or pruning."""
        return sum(im.full_tokens for im in self.images if im.kind == "image")

    @property
    def position_end(self) -> int:
        """The position id after the prompt's last position (its length when nothing was pruned)."""
        return int(self.positions[-1]) + 1 if self.positions is not None and len(self.positions) else len(self.keys)

    def image_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Per position the row of `features` embedded there (-1: a text token), and the features."""
        rows = np.full(len(self.keys), -1, dtype=np.int64)
        at = np.flatnonzero(self.keys < 0)
        rows[at] = np.arange(len(at))
        hidden = self.images[0].features.shape[-1] if self.images else 0
        features = np.concatenate([im.features for im in self.images]) if self.images else np.zeros((0, hidden))
        return rows, features.astype(np.float32, copy=False)


@dataclass
class _ImageJob:
    """One image (or video) of a prompt between loading and encoding."""

    digest: str  # pixel content + chosen resolution (a video: content + sampling): the feature cache's key
    found: PreparedImage | Image.Image | _FramesToEncode  # cached features, or what to encode
    prep_s: float
    resolution: Resolution | FrameCount
    full_tokens: int  # at the model's own resolution (a video: at the requested frame count)
    instruction: str  # the text of the message carrying the image (CDPruner's query)
    tiles: np.ndarray  # per packed position: its tile (a video: its frame), -1 for image_newline
    position: int = 0  # of its placeholder token in the prompt
    video: Video | None = None  # a video's opened source (closed once the prompt is prepared)


@dataclass(frozen=True)
class FrameCount:
    """One way to feed a video: so many uniformly sampled frames (what the image-token budget lowers)."""

    frames: int
    tokens: int

    @property
    def label(self) -> str:
        return f"{self.frames}f"


@dataclass
class _FramesToEncode:
    """The frame indices sampled from a video (its job holds the opened video)."""

    indices: np.ndarray


class Limits(Protocol):
    """What a backend allows a prompt (runtime/backends)."""

    allows_pruning: bool  # pruned image tokens leave gaps in the position ids

    @property
    def prompt_limit(self) -> int: ...

    def limit_reason(self) -> str: ...


def _pixels_digest(image: Image.Image) -> str:
    """An RGB image's pixel content (and size): the feature caches' key."""
    return hashlib.blake2b(image.tobytes(), digest_size=16, person=str(image.size).encode()[:16]).hexdigest()


def _content_key(text: str) -> int:
    """A negative id standing for an image's positions in the cache keys."""
    return -(int(hashlib.blake2b(text.encode(), digest_size=8).hexdigest()[:15], 16) + 1)


def as_messages(prompt: str | Sequence[Message], images: Sequence[Any] = (), videos: Sequence[Any] = ()) -> list[Message]:
    """A plain prompt (+ images and videos) becomes one user message."""
    if isinstance(prompt, str):
        return [Message("user", prompt, list(images), list(videos))]
    if images or videos:
        raise LlavaOvError("pass images and videos inside the messages, not separately, when giving a conversation")
    return list(prompt)


class PromptBuilder:
    """Turns messages into PreparedPrompts for one model and one backend's limits."""

    def __init__(self, model: ExportedModel, limits: Limits):
        self.model = model
        self.limits = limits
        self.template = ChatTemplate.from_export(self.model.export)
        self.features: FeatureCache[PreparedImage] = FeatureCache(
            FEATURE_CACHE_SIZE, FEATURE_CACHE_BYTES, weigh=lambda image: image.features.nbytes
        )
        self.frame_features: FeatureCache[np.ndarray] = FeatureCache(FRAME_CACHE_SIZE)
        self.video_limits = VideoLimits()
        self.image_places = PREPARATIONS_PER_VISION_REQUEST * model.vision_requests  # prompts holding images at once
        self._image_slots = threading.BoundedSemaphore(self.image_places)
        self._lead_ids: np.ndarray | None = None  # the tokenizer's leading special tokens (for CDPruner queries)

    # ---------------------------------------------------------------- images

    def prepare_image(self, source: Any) -> PreparedImage:
        """Preprocess + encode + pack one image at the model's own resolution, cached by pixel content."""
        with self._image_slots:
            (image, load_s), = self._load_images([source])
            options = self.model.family.resolutions((image.height, image.width))
            return self._features_of(self._image_job(image, load_s, options, options[0], ""))

    def _features_of(self, job: _ImageJob, cancel: Cancel = None) -> PreparedImage:
        """The job's cached features, or its encoding (once, however many ask for it at the same time)."""
        if isinstance(job.found, PreparedImage):
            return job.found
        while True:
            try:
                return self.features.get_or_make(job.digest, lambda: self._encode(job, cancel))
            except VideoCancelled:
                if cancel is not None and cancel():
                    raise
                # another request's cancel stopped the encoding this one waited for: encode it again

    def _load_images(self, sources: Sequence[Any]) -> list[tuple[Image.Image, float]]:
        loaded = []
        for src in sources:
            started = time.perf_counter()
            loaded.append((load_image(src), time.perf_counter() - started))
        return loaded

    def _image_job(self, image: Image.Image, load_s: float, options: list[Resolution], res: Resolution, text: str) -> _ImageJob:
        """An image's cache lookup at one resolution (pixels are made only for an encode)."""
        started = time.perf_counter()
        size = (image.height, image.width)
        digest = f"{_pixels_digest(image)}:{res.label}"
        found: PreparedImage | Image.Image | None = self.features.get(digest)
        if found is not None:
            found, prep_s = PreparedImage(found.key, found.features, full_tokens=options[0].tokens), 0.0
        else:
            found, prep_s = image, load_s + time.perf_counter() - started
        return _ImageJob(digest, found, prep_s, res, options[0].tokens, text, self.model.family.packed_tiles(size, res))

    # ---------------------------------------------------------------- videos

    def _open_videos(self, sources: Sequence[Any]) -> list[tuple[Video, float]]:
        """Every video opened and checked (nothing decoded yet); a refused one closes those before it."""
        opened: list[tuple[Video, float]] = []
        try:
            for src in sources:
                started = time.perf_counter()
                opened.append((open_video(src, self.video_limits), time.perf_counter() - started))
        except BaseException:
            for video, _ in opened:
                video.close()
            raise
        return opened

    def _frame_options(self, video: Video, config: GenerationConfig) -> list[FrameCount]:
        """The frame counts a video can be fed with, most first: the requested (or default) count, then fewer."""
        family, info = self.model.family, video.info
        if config.video_fps is not None:
            wanted = len(sample_indices(info.frames, fps=config.video_fps, video_fps=info.fps))
        else:
            wanted = config.num_frames or family.default_frames
        wanted = max(1, min(wanted, info.frames))
        separators = len(family.video_tiles(0))  # tokens a video has beside its frames' (OneVision's newline)
        return [FrameCount(n, n * family.tokens_per_frame + separators) for n in range(wanted, 0, -1)]

    def _video_job(self, video: Video, load_s: float, options: list[FrameCount], chosen: FrameCount, text: str) -> _ImageJob:
        """A video's cache lookup: its content digest and sampling (frames are decoded only for an encode)."""
        indices = sample_indices(video.info.frames, num_frames=chosen.frames)
        sampling = hashlib.blake2b(indices.astype(np.int64).tobytes(), digest_size=8).hexdigest()
        digest = f"video:{video.digest_seed}:{chosen.label}:{sampling}"
        found: PreparedImage | _FramesToEncode | None = self.features.get(digest)
        if found is not None:
            found = replace(found, full_tokens=options[0].tokens, preprocess_s=0.0, vision_s=0.0)
        else:
            found = _FramesToEncode(indices)
        tiles = self.model.family.video_tiles(chosen.frames)
        return _ImageJob(digest, found, load_s, chosen, options[0].tokens, text, tiles, video=video)

    def _encode(self, job: _ImageJob, cancel: Cancel) -> PreparedImage:
        if isinstance(job.found, _FramesToEncode):
            return self._encode_video(job, job.video, job.found, cancel)
        return self._encode_image(job)

    def _encode_video(self, job: _ImageJob, video: Video, todo: _FramesToEncode, cancel: Cancel) -> PreparedImage:
        """Decode the sampled frames one at a time, encode the new ones in batches (cached per frame)."""
        prep_s, vision_s = job.prep_s, 0.0
        features: list[np.ndarray | None] = []
        batch: list[tuple[int, str, np.ndarray]] = []  # (slot, frame digest, pixels)
        started = time.perf_counter()
        with closing(video.frames(todo.indices, cancel)) as frames:  # its decoder closes on any error too
            for frame in frames:
                key = _pixels_digest(frame)
                cached = self.frame_features.get(key)
                features.append(cached)
                if cached is None:
                    batch.append((len(features) - 1, key, self.model.family.preprocess_frames([frame])[0]))
                if len(batch) == FRAMES_PER_ENCODE:
                    vision_s += self._encode_frame_batch(batch, features, cancel)
                    batch = []
        vision_s += self._encode_frame_batch(batch, features, cancel)
        prep_s += time.perf_counter() - started - vision_s
        packed = self.model.family.pack_frames([f for f in features if f is not None])
        return PreparedImage(
            _content_key(job.digest), packed, prep_s, vision_s, job.full_tokens, kind="video", frames=len(features)
        )

    def _encode_frame_batch(self, batch: list[tuple[int, str, np.ndarray]], features: list, cancel: Cancel) -> float:
        """Encode a batch of frames into their slots of `features` (and the frame cache); seconds spent."""
        if not batch:
            return 0.0
        if cancel is not None and cancel():
            raise VideoCancelled("cancelled while the video's frames were encoded")
        started = time.perf_counter()
        encoded = self.model.encode_frames(np.stack([pixels for _, _, pixels in batch]))
        for (slot, digest, _), frame_features in zip(batch, encoded):
            features[slot] = self.frame_features.get_or_make(digest, lambda f=frame_features: f.copy())
        return time.perf_counter() - started

    def _close(self, jobs: Sequence[_ImageJob]) -> None:
        for job in jobs:
            if job.video is not None:
                job.video.close()

    def _encode_image(self, job: _ImageJob) -> PreparedImage:
        started = time.perf_counter()
        processed = self.model.family.preprocess(job.found, job.resolution)
        start = time.perf_counter()
        tiles = self.model.encode_image_tiles(processed.pixel_values)
        packed = self.model.family.pack(tiles, processed)
        vision_s = time.perf_counter() - start
        prep_s = job.prep_s + start - started
        return PreparedImage(_content_key(job.digest), packed, prep_s, vision_s, job.full_tokens)

    def _prune(self, image: PreparedImage, job: _ImageJob, ratio: float) -> PreparedImage:
        """The image's tokens CDPruner keeps for its instruction (the text of the message carrying it)."""
        started = time.perf_counter()
        instruction = self.model.embed_instruction(self._instruction_ids(job.instruction))
        kept = select_tokens(image.features, job.tiles, instruction, ratio)
        key = _content_key(f"{job.digest}:{hashlib.blake2b(kept.tobytes(), digest_size=16).hexdigest()}")
        return PreparedImage(
            key, image.features[kept], image.preprocess_s, image.vision_s, image.full_tokens, kept,
            len(image.features), time.perf_counter() - started, image.kind, image.frames,
        )  # fmt: skip

    def _instruction_ids(self, text: str) -> np.ndarray:
        """The instruction's token ids, without the tokenizer's leading special tokens (BOS)."""
        ids = self.model.tokenizer.encode(text)
        if self._lead_ids is None:
            self._lead_ids = self.model.tokenizer.encode("")  # what the tokenizer adds to any text
        lead = self._lead_ids
        return ids[len(lead) :] if len(ids) >= len(lead) and np.array_equal(ids[: len(lead)], lead) else ids

    # ---------------------------------------------------------------- prompts

    def render(self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text; `tools` (OpenAI function definitions) reach templates that render them."""
        return self.template.render([m.for_template() for m in messages], add_generation_prompt=True, tools=tools)

    def prepare(
        self, messages: Sequence[Message], config: GenerationConfig | None = None, max_tokens: int | None = None,
        cancel: Cancel = None,
    ) -> PreparedPrompt:
        """Render, tokenize and expand `<image>`/`<video>` into each one's feature positions.

        `config` brings the image-token budget, video sampling and visual-token pruning; a prompt over
        `max_tokens` (a caller's limit, e.g. a server's) is refused before any image is encoded;
        `cancel()` true stops a video's decoding and encoding (VideoCancelled)."""
        with self._image_room(messages):
            return self._prepare(messages, config or GenerationConfig(), max_tokens, cancel)

    @contextmanager
    def _image_room(self, messages: Sequence[Message]) -> Iterator[None]:
        """Wait for one of `image_places` when the messages carry images or videos (text passes)."""
        if not any(m.images or m.videos for m in messages):
            yield
            return
        with self._image_slots:
            yield

    def _prepare(
        self, messages: Sequence[Message], config: GenerationConfig, max_tokens: int | None, cancel: Cancel
    ) -> PreparedPrompt:
        ratio = config.visual_token_pruning
        ids, jobs = self._tokenize(messages, config, max_tokens, check=True)
        try:
            images = [self._features_of(j, cancel) for j in jobs]
        finally:
            self._close(jobs)
        if ratio:
            images = [self._prune(image, job, ratio) for image, job in zip(images, jobs)]
        return self._layout(ids, [j.position for j in jobs], images)

    def _layout(self, ids: np.ndarray, positions: Sequence[int], images: list[PreparedImage]) -> PreparedPrompt:
        """Token ids, cache keys and position ids with each placeholder expanded into its features' positions."""
        pieces_ids, pieces_keys, pieces_pos, prev, offset = [], [], [], 0, 0
        for pos, image in zip(positions, images):
            text = ids[prev:pos]
            token = self.model.family.video_token_id if image.kind == "video" else self.model.image_token_id
            pieces_ids += [text, np.full(len(image.features), token, np.int64)]
            pieces_keys += [text, np.full(len(image.features), image.key, np.int64)]
            start = offset + len(text)
            kept = image.kept if image.kept is not None else np.arange(len(image.features))
            pieces_pos += [np.arange(offset, start), start + kept]
            offset = start + image.packed_tokens
            prev = pos + 1
        pieces_ids.append(ids[prev:])
        pieces_keys.append(ids[prev:])
        pieces_pos.append(np.arange(offset, offset + len(ids) - prev))
        pruned = any(im.kept is not None for im in images)
        return PreparedPrompt(
            np.concatenate(pieces_ids), np.concatenate(pieces_keys), images,
            np.concatenate(pieces_pos).astype(np.int64) if pruned else None,
        )  # fmt: skip

    def _tokenize(
        self, messages: Sequence[Message], config: GenerationConfig, max_tokens: int | None = None, check: bool = False
    ) -> tuple[np.ndarray, list[_ImageJob]]:
        """(ids, planned images and videos in prompt order): everything but decoding frames and vision encoding.

        The caller closes the jobs' videos (`_close`)."""
        family = self.model.family
        videos = [v for m in messages for v in m.videos]
        if videos and not family.takes_video:
            raise no_video(family.architecture)
        text = self.render(messages, config.tools)
        self._check_text_size(text)
        ids = self.model.tokenizer.encode(text)
        images = [img for m in messages for img in m.images]
        image_at = self._placeholders(ids, self.model.image_token_id, len(images), "<image>", "images")
        video_at = self._placeholders(ids, family.video_token_id, len(videos), "<video>", "videos")
        if config.visual_token_pruning and not self.limits.allows_pruning:
            raise LlavaOvError("visual-token pruning needs the paged KV cache (load with kv_cache='paged')")
        jobs = self._plan(
            images, [m.text for m in messages for _ in m.images], videos, [m.text for m in messages for _ in m.videos],
            config, len(ids) - len(image_at) - len(video_at), max_tokens, check,
        )  # fmt: skip
        for job, position in zip(jobs, [*image_at, *video_at]):
            job.position = int(position)
        return ids, sorted(jobs, key=lambda j: j.position)

    @staticmethod
    def _placeholders(ids: np.ndarray, token: int | None, count: int, name: str, what: str) -> np.ndarray:
        """Where a placeholder token stands in the prompt; as many as there are items, or a clear error."""
        found = np.flatnonzero(ids == token) if token is not None else np.zeros(0, np.int64)
        if len(found) != count:
            raise LlavaOvError(f"the prompt has {len(found)} {name} tokens but {count} {what} were given")
        return found

    def _plan(
        self, images: Sequence[Any], image_texts: Sequence[str], videos: Sequence[Any], video_texts: Sequence[str],
        config: GenerationConfig, text_tokens: int, max_tokens: int | None = None, check: bool = False,
    ) -> list[_ImageJob]:  # fmt: skip
        """Choose every image's resolution and video's frame count within the budget from their declared sizes,
        refuse (`check`) a prompt that cannot fit before any image is decoded, then decode the images and look
        their features up; images first, then videos."""
        images = [source_bytes(src) for src in images]  # a file is read once, for its header and its pixels
        sizes = [declared_size(src) for src in images]  # headers only
        opened = self._open_videos(videos)
        try:
            video_options = [self._frame_options(video, config) for video, _ in opened]
            image_options, chosen = self._choose(sizes, video_options, config, text_tokens, max_tokens, check)
            loaded = self._load_images(images)
            upright = [(img.height, img.width) for img, _ in loaded]
            if upright != sizes:  # an orientation only decoding revealed (a PNG's late eXIf chunk)
                image_options, chosen = self._choose(upright, video_options, config, text_tokens, max_tokens, check)
            jobs = [self._image_job(img, s, o, c, t)
                    for (img, s), o, c, t in zip(loaded, image_options, chosen, image_texts)]  # fmt: skip
            chosen = chosen[len(loaded):]
            return jobs + [self._video_job(v, s, o, c, t)
                           for (v, s), o, c, t in zip(opened, video_options, chosen, video_texts)]  # fmt: skip
        except BaseException:
            for video, _ in opened:
                video.close()
            raise

    def _choose(
        self, sizes: list[tuple[int, int]], video_options: list[list[FrameCount]], config: GenerationConfig,
        text_tokens: int, max_tokens: int | None, check: bool,
    ) -> tuple[list[list[Resolution]], list[Resolution | FrameCount]]:  # fmt: skip
        """(each image's resolutions, the chosen resolution or frame count of each image and video), the
        prompt's length checked (`check`) from the sizes alone."""
        family = self.model.family
        image_options = [family.resolutions(size, len(sizes)) for size in sizes]
        chosen = self._fit(image_options, video_options, config, text_tokens, max_tokens)
        if check:
            tiles = [family.packed_tiles(size, res) for size, res in zip(sizes, chosen)]
            tiles += [family.video_tiles(c.frames) for c in chosen[len(sizes):]]
            self._check_planned(text_tokens, tiles, config.visual_token_pruning, max_tokens)
        return image_options, chosen

    def _check_planned(self, text_tokens: int, tiles: list[np.ndarray], ratio: float, max_tokens: int | None) -> None:
        """Refuse a prompt over the caller's `max_tokens`, the context or the KV pool, before any vision work."""
        image_tokens = sum(self._visual_tokens(t, ratio) for t in tiles)
        total = text_tokens + image_tokens
        if max_tokens is not None and total > max_tokens:
            raise ContextLengthError(
                f"the prompt is {total} tokens ({image_tokens} of them for images and videos); prompts of at "
                f"most {max_tokens} are taken here (fewer or smaller images, fewer frames, or max_image_tokens)"
            )
        self._check_length(total, image_tokens)
        if ratio:  # pruned tokens keep their positions: the prompt spans as many as it would unpruned
            self._check_positions(text_tokens + sum(len(t) for t in tiles))

    def _fit(
        self, image_options: list[list[Resolution]], video_options: list[list[FrameCount]], config: GenerationConfig,
        text_tokens: int, max_tokens: int | None = None,
    ) -> list[Resolution | FrameCount]:  # fmt: skip
        """fit_budget over images and videos (a video's step down is one frame fewer: each remaining frame's
        features stay as the model was trained, where a coarser pooling or a smaller frame would change
        them). With no budget and videos at their default frame count, the videos get fewer frames when the
        prompt would not fit the context (or the caller's `max_tokens`); images keep theirs."""
        options: list[list[Any]] = [*image_options, *video_options]
        if config.max_image_tokens is not None or not video_options or config.num_frames or config.video_fps:
            return fit_budget(options, config.max_image_tokens)
        limit = self.limits.prompt_limit if max_tokens is None else min(self.limits.prompt_limit, max_tokens + 1)
        room = limit - text_tokens - min(config.max_new_tokens, ANSWER_ROOM)
        fixed = [opts[:1] for opts in image_options]
        images = sum(opts[0].tokens for opts in image_options)
        if room - images < sum(opts[-1].tokens for opts in video_options):
            return [opts[0] for opts in options]  # not even one frame each fits: the length check says so
        return fit_budget([*fixed, *video_options], room)

    @staticmethod
    def _visual_tokens(tiles: np.ndarray, ratio: float) -> int:
        """Tokens an image or video will take, from its packed tiles (after the budget and pruning)."""
        if not ratio:
            return len(tiles)
        newlines = int((tiles < 0).sum())
        return newlines + kept_count(len(tiles) - newlines, ratio)

    def count_tokens(self, messages: Sequence[Message], config: GenerationConfig | None = None) -> int:
        """Prompt tokens of `messages`, image and video tokens included, from sizes alone (nothing is encoded)."""
        config = config or GenerationConfig()
        with self._image_room(messages):
            ids, jobs = self._tokenize(messages, config)
            self._close(jobs)
        return len(ids) - len(jobs) + sum(self._visual_tokens(j.tiles, config.visual_token_pruning) for j in jobs)

    # ---------------------------------------------------------------- context checks

    def check_context(self, prompt: PreparedPrompt) -> None:
        self._check_length(len(prompt.token_ids), prompt.visual_tokens)
        self._check_positions(prompt.position_end)

    def _check_positions(self, position_end: int) -> None:
        """Position ids must stay inside the model's context, also where pruning left gaps in them."""
        if position_end >= self.model.max_context:
            raise ContextLengthError(
                f"the prompt spans {position_end} positions (pruned image tokens keep theirs); the model's "
                f"context is {self.model.max_context} positions (fewer or smaller images, or max_image_tokens)"
            )

    def _check_text_size(self, text: str) -> None:
        """Refuse text that cannot fit before tokenizing it: no token covers more than the longest
        vocabulary piece, so a prompt has at least bytes / longest piece tokens (x4: normalization
        may shorten the text)."""
        floor = len(text) // (4 * self.model.tokenizer.max_piece_bytes)  # chars <= UTF-8 bytes
        limit = self.limits.prompt_limit
        if floor >= limit:
            raise ContextLengthError(
                f"the prompt is {len(text):,} characters, at least {floor:,} tokens; "
                f"the limit is {limit:,} tokens"
            )

    def _check_length(self, total: int, image_tokens: int) -> None:
        """A prompt must leave room for one new token in the context (and in the engine's KV pool)."""
        limit = self.limits.prompt_limit
        where = self.limits.limit_reason()
        if total >= limit:
            raise ContextLengthError(
                f"the prompt is {total} tokens ({image_tokens} of them for images); {where} {limit} tokens"
            )
