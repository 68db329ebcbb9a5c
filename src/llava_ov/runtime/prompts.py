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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from llava_ov.errors import ContextLengthError, LlavaOvError
from llava_ov.runtime.budget import Resolution, fit_budget
from llava_ov.runtime.feature_cache import FeatureCache
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.image import load_image
from llava_ov.runtime.model import ExportedModel
from llava_ov.runtime.pruning import kept_count, select_tokens
from llava_ov.runtime.template import ChatTemplate

FEATURE_CACHE_SIZE = 16
# Prompts that hold decoded images at once (loading, preprocessing, encoding), per vision request:
# memory stays bounded however many requests arrive, and loading overlaps encoding.
PREPARATIONS_PER_VISION_REQUEST = 2


@dataclass
class Message:
    """One chat turn: role ("system" | "user" | "assistant"), text, and the images it carries."""

    role: str
    text: str = ""
    images: list[Any] = field(default_factory=list)  # paths, bytes, PIL images or arrays

    def for_template(self) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": self.text}]
        content += [{"type": "image"} for _ in self.images]
        return {"role": self.role, "content": content}


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
    def image_tokens(self) -> int:
        return sum(len(im.features) for im in self.images)

    @property
    def image_tokens_total(self) -> int:
        """Image tokens the model's own resolution would make, without a budget or pruning."""
        return sum(im.full_tokens for im in self.images)

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
    """One image of a prompt between loading and encoding."""

    digest: str  # pixel content + chosen resolution: the feature cache's key
    found: PreparedImage | Image.Image  # cached features, or the loaded image (preprocessed when encoded)
    prep_s: float
    resolution: Resolution
    full_tokens: int  # at the model's own resolution
    instruction: str  # the text of the message carrying the image (CDPruner's query)
    tiles: np.ndarray  # per packed position: its tile, -1 for image_newline (Family.packed_tiles)


class Limits(Protocol):
    """What a backend allows a prompt (runtime/backends)."""

    allows_pruning: bool  # pruned image tokens leave gaps in the position ids

    @property
    def prompt_limit(self) -> int: ...

    def limit_reason(self) -> str: ...


def _content_key(text: str) -> int:
    """A negative id standing for an image's positions in the cache keys."""
    return -(int(hashlib.blake2b(text.encode(), digest_size=8).hexdigest()[:15], 16) + 1)


def as_messages(prompt: str | Sequence[Message], images: Sequence[Any] = ()) -> list[Message]:
    """A plain prompt (+ images) becomes one user message."""
    if isinstance(prompt, str):
        return [Message("user", prompt, list(images))]
    if images:
        raise LlavaOvError("pass images inside the messages, not separately, when giving a conversation")
    return list(prompt)


class PromptBuilder:
    """Turns messages into PreparedPrompts for one model and one backend's limits."""

    def __init__(self, model: ExportedModel, limits: Limits):
        self.model = model
        self.limits = limits
        self.template = ChatTemplate.from_export(self.model.export)
        self.features: FeatureCache[PreparedImage] = FeatureCache(FEATURE_CACHE_SIZE)
        self.image_places = PREPARATIONS_PER_VISION_REQUEST * model.vision_requests  # prompts holding images at once
        self._image_slots = threading.BoundedSemaphore(self.image_places)
        self._lead_ids: np.ndarray | None = None  # the tokenizer's leading special tokens (for CDPruner queries)

    # ---------------------------------------------------------------- images

    def prepare_image(self, source: Any) -> PreparedImage:
        """Preprocess + encode + pack one image at the model's own resolution, cached by pixel content."""
        with self._image_slots:
            job = self._plan_images([source], [""], None)[0]
            return self._features_of(job)

    def _features_of(self, job: _ImageJob) -> PreparedImage:
        """The job's cached features, or its encoding (once, however many ask for it at the same time)."""
        if isinstance(job.found, PreparedImage):
            return job.found
        return self.features.get_or_make(job.digest, lambda: self._encode_image(job))

    def _plan_images(self, sources: Sequence[Any], texts: Sequence[str], budget: int | None) -> list[_ImageJob]:
        """Load every image, choose its resolution within `budget`, and look its features up (no encoding)."""
        loaded = []
        for src in sources:
            started = time.perf_counter()
            loaded.append((load_image(src), time.perf_counter() - started))
        options = [self.model.family.resolutions((img.height, img.width)) for img, _ in loaded]
        jobs = []
        for (image, load_s), opts, res, text in zip(loaded, options, fit_budget(options, budget), texts):
            started = time.perf_counter()
            size = (image.height, image.width)
            digest = hashlib.blake2b(image.tobytes(), digest_size=16, person=str(image.size).encode()[:16]).hexdigest()
            digest = f"{digest}:{res.label}"
            found: PreparedImage | Image.Image | None = self.features.get(digest)
            if found is not None:
                found, prep_s = PreparedImage(found.key, found.features, full_tokens=opts[0].tokens), 0.0
            else:  # pixels are made only for an encode (counting tokens needs the sizes alone)
                found, prep_s = image, load_s + time.perf_counter() - started
            tiles = self.model.family.packed_tiles(size, res)
            jobs.append(_ImageJob(digest, found, prep_s, res, opts[0].tokens, text, tiles))
        return jobs

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
            len(image.features), time.perf_counter() - started,
        )  # fmt: skip

    def _instruction_ids(self, text: str) -> np.ndarray:
        """The instruction's token ids, without the tokenizer's leading special tokens (BOS)."""
        ids = self.model.tokenizer.encode(text)
        if self._lead_ids is None:
            self._lead_ids = self.model.tokenizer.encode("")  # what the tokenizer adds to any text
        lead = self._lead_ids
        return ids[len(lead) :] if len(ids) >= len(lead) and np.array_equal(ids[: len(lead)], lead) else ids

    # ---------------------------------------------------------------- prompts

    def render(self, messages: Sequence[Message]) -> str:
        return self.template.render([m.for_template() for m in messages], add_generation_prompt=True)

    def prepare(
        self, messages: Sequence[Message], config: GenerationConfig | None = None, max_tokens: int | None = None
    ) -> PreparedPrompt:
        """Render, tokenize and expand `<image>` into each image's feature positions.

        `config` brings the image-token budget and visual-token pruning (none by default); a prompt
        over `max_tokens` (a caller's limit, e.g. a server's) is refused before any image is encoded."""
        with self._image_room(messages):
            return self._prepare(messages, config or GenerationConfig(), max_tokens)

    @contextmanager
    def _image_room(self, messages: Sequence[Message]) -> Iterator[None]:
        """Wait for one of `image_places` when the messages carry images (text passes)."""
        if not any(m.images for m in messages):
            yield
            return
        with self._image_slots:
            yield

    def _prepare(self, messages: Sequence[Message], config: GenerationConfig, max_tokens: int | None) -> PreparedPrompt:
        ratio = config.visual_token_pruning
        ids, positions, jobs = self._tokenize(messages, config)
        image_tokens = sum(self._image_tokens(j, ratio) for j in jobs)
        total = len(ids) - len(jobs) + image_tokens
        if max_tokens is not None and total > max_tokens:
            raise ContextLengthError(
                f"the prompt is {total} tokens ({image_tokens} of them for images); prompts of at most "
                f"{max_tokens} are taken here (fewer or smaller images, or max_image_tokens, make it shorter)"
            )
        self._check_length(total, image_tokens)  # before any vision encoding
        if ratio:  # pruned tokens keep their positions: the prompt spans as many as it would unpruned
            self._check_positions(len(ids) - len(jobs) + sum(len(j.tiles) for j in jobs))
        images = [self._features_of(j) for j in jobs]
        if ratio:
            images = [self._prune(image, job, ratio) for image, job in zip(images, jobs)]
        return self._layout(ids, positions, images)

    def _layout(self, ids: np.ndarray, positions: np.ndarray, images: list[PreparedImage]) -> PreparedPrompt:
        """Token ids, cache keys and position ids with each `<image>` expanded into its features' positions."""
        pieces_ids, pieces_keys, pieces_pos, prev, offset = [], [], [], 0, 0
        for pos, image in zip(positions, images):
            text = ids[prev:pos]
            pieces_ids += [text, np.full(len(image.features), self.model.image_token_id, np.int64)]
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

    def _tokenize(self, messages: Sequence[Message], config: GenerationConfig) -> tuple[np.ndarray, np.ndarray, list]:
        """(ids, <image> positions, planned images): everything but vision encoding."""
        text = self.render(messages)
        self._check_text_size(text)
        ids = self.model.tokenizer.encode(text)
        sources = [img for m in messages for img in m.images]
        texts = [m.text for m in messages for _ in m.images]
        positions = np.flatnonzero(ids == self.model.image_token_id)
        if len(positions) != len(sources):
            raise LlavaOvError(f"the prompt has {len(positions)} <image> tokens but {len(sources)} images were given")
        if config.visual_token_pruning and not self.limits.allows_pruning:
            raise LlavaOvError("visual-token pruning needs the paged KV cache (load with kv_cache='paged')")
        return ids, positions, self._plan_images(sources, texts, config.max_image_tokens)

    def _image_tokens(self, job: _ImageJob, ratio: float) -> int:
        """Tokens an image will take, from its sizes alone (after the budget and pruning)."""
        if not ratio:
            return len(job.tiles)
        newlines = int((job.tiles < 0).sum())
        return newlines + kept_count(len(job.tiles) - newlines, ratio)

    def count_tokens(self, messages: Sequence[Message], config: GenerationConfig | None = None) -> int:
        """Prompt tokens of `messages`, image tokens included, from the image sizes (nothing is encoded)."""
        config = config or GenerationConfig()
        with self._image_room(messages):
            ids, _, jobs = self._tokenize(messages, config)
        return len(ids) - len(jobs) + sum(self._image_tokens(j, config.visual_token_pruning) for j in jobs)

    # ---------------------------------------------------------------- context checks

    def check_context(self, prompt: PreparedPrompt) -> None:
        self._check_length(len(prompt.token_ids), prompt.image_tokens)
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
