"""`Pipeline`: the Python API every front end calls.

`stream` (an iterator of text pieces ending with a finish reason) and `generate`
(collects a stream).  A prompt is a list of chat messages.  With the paged KV cache (the
default) every call becomes a sequence of the shared `Engine`: calls from many threads run
together in one forward, and any prompt that starts like an earlier one (a follow-up chat
turn, a second user's conversation) reuses its cached KV blocks.  With the stateful cache
(`kv_cache="stateful"`, the NPU path) one call runs at a time and the cache keeps the longest
prefix shared with the previous call; `prefill`/`step` (one forward) exist there only.
Image features are cached by content either way.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llava_ov.runtime.budget import Resolution, fit_budget
from llava_ov.runtime.constrained import JsonConstraint, JsonGrammars
from llava_ov.errors import ContextLengthError, LlavaOvError
from llava_ov.runtime.engine.core import Engine, Failed, Progress
from llava_ov.runtime.features import merge_embeddings
from llava_ov.runtime.generate import Constraint, DecodeState, ForcedDecode, GenerationConfig, TokenEvent, TokenLogprob
from llava_ov.runtime.image import ProcessedImage, load_image
from llava_ov.runtime.pruning import kept_count, select_tokens
from llava_ov.runtime.model import ExportedModel
from llava_ov.runtime.settings import LoadSettings
from llava_ov.runtime.template import ChatTemplate

FEATURE_CACHE_SIZE = 16


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
class Timings:
    queue_s: float = 0.0  # waiting for the engine to start the prompt (other sequences ran)
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prune_s: float = 0.0  # CDPruner's selection of the image tokens to keep
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # from the call to the first token (includes image work and prefill)
    grammar_s: float = 0.0  # in the JSON grammar's mask and advance (0 without a schema)
    token_s: list[float] = field(default_factory=list)  # per generated token after the first

    @property
    def decode_s(self) -> float:
        return float(sum(self.token_s))

    @property
    def tpot_s(self) -> float:
        return self.decode_s / len(self.token_s) if self.token_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_s) / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict[str, float]:
        out = {k: round(v, 6) for k, v in asdict(self).items() if k != "token_s"}
        out.update(decode_s=round(self.decode_s, 6), tpot_s=round(self.tpot_s, 6), tokens_per_s=self.tokens_per_s)
        return out


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # eos | length | stop | cancelled
    prompt_tokens: int  # including image tokens
    image_tokens: int
    cached_tokens: int  # prompt tokens reused from the KV cache (not prefilled)
    timings: Timings
    logprobs: list[TokenLogprob] | None = None  # one per token, when the config asks for them
    image_tokens_total: int = 0  # image tokens at the model's own resolution (image_tokens: those kept)

    def image_token_note(self) -> str:
        """'2928 image' or, when a budget or pruning removed some, '732 of 2928 image tokens kept'."""
        if self.image_tokens_total and self.image_tokens != self.image_tokens_total:
            return f"{self.image_tokens} of {self.image_tokens_total} image tokens kept"
        return f"{self.image_tokens} image"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["timings"] = self.timings.as_dict()
        return out


@dataclass
class StreamChunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    result: GenerationResult | None = None  # on the last chunk
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of this chunk's tokens, when asked for


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
    found: PreparedImage | ProcessedImage  # cached features, or pixels still to encode
    prep_s: float
    resolution: Resolution
    full_tokens: int  # at the model's own resolution
    instruction: str  # the text of the message carrying the image (CDPruner's query)
    tiles: np.ndarray  # per packed position: its tile, -1 for image_newline (features.packed_tiles)


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


class Pipeline:
    """A loaded export ready to answer questions about images.

    `settings` says how to load and run it; keyword arguments override single fields of it,
    e.g. `Pipeline(path, device="GPU", kv_cache="stateful", max_running=8)`."""

    def __init__(self, model_dir: str | Path, settings: LoadSettings | None = None, **overrides: Any):
        self.settings = (settings or LoadSettings()).with_overrides(**overrides)
        self.model = ExportedModel(model_dir, self.settings)
        self.template = ChatTemplate.from_export(self.model.export)
        self.eos_ids = self._eos_ids()
        self._features: OrderedDict[str, PreparedImage] = OrderedDict()
        self.engine: Engine | None = None
        if self.model.paged is not None:
            self.engine = Engine(self.model.paged, self.model.max_context, self.settings)
        self._keys = None if self.engine is not None else np.empty(self.model.max_context + 1, np.int64)  # the stateful cache's
        # Guards the tokenizer and vision requests (prepare/count_tokens); on the stateful path
        # it is also held for a whole generation, one at a time.
        self._lock = threading.RLock()
        self._cancels: set[threading.Event] = set()
        self._grammars: JsonGrammars | None = None  # built on the first request with a JSON schema
        self._lead_ids: np.ndarray | None = None  # the tokenizer's leading special tokens (for CDPruner queries)
        self._grammars_lock = threading.Lock()

    @property
    def max_concurrency(self) -> int:
        """How many generations make progress at once (the engine's max_running; 1 when stateful)."""
        return self.engine.config.max_running if self.engine is not None else 1

    def _eos_ids(self) -> set[int]:
        return self.model.export.eos_ids()

    # ---------------------------------------------------------------- images

    def prepare_image(self, source: Any) -> PreparedImage:
        """Preprocess + encode + pack one image at the model's own resolution, cached by pixel content."""
        with self._lock:  # the feature cache and the vision request are shared with generation's prepare
            job = self._plan_images([source], [""], None)[0]
            return job.found if isinstance(job.found, PreparedImage) else self._encode_image(job)

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
            found: PreparedImage | ProcessedImage | None = self._features.get(digest)
            if found is not None:
                self._features.move_to_end(digest)
                found, prep_s = PreparedImage(found.key, found.features, full_tokens=opts[0].tokens), 0.0
            else:
                found = self.model.family.preprocess(image, res)
                prep_s = load_s + time.perf_counter() - started
            tiles = self.model.family.packed_tiles(size, res)
            jobs.append(_ImageJob(digest, found, prep_s, res, opts[0].tokens, text, tiles))
        return jobs

    def _encode_image(self, job: _ImageJob) -> PreparedImage:
        processed: ProcessedImage = job.found
        start = time.perf_counter()
        tiles = self.model.encode_image_tiles(processed.pixel_values)
        packed = self.model.family.pack(tiles, processed)
        vision_s = time.perf_counter() - start
        entry = PreparedImage(_content_key(job.digest), packed, job.prep_s, vision_s, job.full_tokens)
        self._features[job.digest] = entry
        if len(self._features) > FEATURE_CACHE_SIZE:
            self._features.popitem(last=False)
        return entry

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

    def prepare(self, messages: Sequence[Message], config: GenerationConfig | None = None) -> PreparedPrompt:
        """Render, tokenize and expand `<image>` into each image's feature positions.

        `config` brings the image-token budget and visual-token pruning (none by default)."""
        with self._lock:  # the tokenizer and vision requests are shared with a running generation
            return self._prepare_locked(messages, config or GenerationConfig())

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
        if config.visual_token_pruning and self.engine is None:
            raise LlavaOvError("visual-token pruning needs the paged KV cache (load with kv_cache='paged')")
        return ids, positions, self._plan_images(sources, texts, config.max_image_tokens)

    def _image_tokens(self, job: _ImageJob, ratio: float) -> int:
        """Tokens an image will take, from its sizes alone (after the budget and pruning)."""
        if not ratio:
            return len(job.tiles)
        newlines = int((job.tiles < 0).sum())
        return newlines + kept_count(len(job.tiles) - newlines, ratio)

    def _prepare_locked(self, messages: Sequence[Message], config: GenerationConfig) -> PreparedPrompt:
        ratio = config.visual_token_pruning
        ids, positions, jobs = self._tokenize(messages, config)
        image_tokens = sum(self._image_tokens(j, ratio) for j in jobs)
        total = len(ids) - len(jobs) + image_tokens
        if config.max_prompt_tokens is not None and total > config.max_prompt_tokens:
            raise ContextLengthError(
                f"the prompt is {total} tokens ({image_tokens} of them for images); this server takes at most "
                f"{config.max_prompt_tokens} (fewer or smaller images, or max_image_tokens, make it shorter)"
            )
        self._check_length(total, image_tokens)  # before any vision encoding
        if ratio:  # pruned tokens keep their positions: the prompt spans as many as it would unpruned
            self._check_positions(len(ids) - len(jobs) + sum(len(j.tiles) for j in jobs))
        images = [j.found if isinstance(j.found, PreparedImage) else self._encode_image(j) for j in jobs]
        if ratio:
            images = [self._prune(image, job, ratio) for image, job in zip(images, jobs)]
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

    def count_tokens(self, messages: Sequence[Message], config: GenerationConfig | None = None) -> int:
        """Prompt tokens of `messages`, image tokens included, from the image sizes (nothing is encoded)."""
        config = config or GenerationConfig()
        with self._lock:
            ids, _, jobs = self._tokenize(messages, config)
        return len(ids) - len(jobs) + sum(self._image_tokens(j, config.visual_token_pruning) for j in jobs)

    @property
    def prompt_limit(self) -> int:
        """The most tokens a prompt plus its answer may take: the context, or the engine's KV pool if smaller."""
        return self.engine.token_limit if self.engine is not None else self.model.max_context

    def _check_context(self, prompt: PreparedPrompt) -> None:
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
        if floor >= self.prompt_limit:
            raise ContextLengthError(
                f"the prompt is {len(text):,} characters, at least {floor:,} tokens; "
                f"the limit is {self.prompt_limit:,} tokens"
            )

    def _check_length(self, total: int, image_tokens: int) -> None:
        """A prompt must leave room for one new token in the context (and in the engine's KV pool)."""
        limit = self.prompt_limit
        where = self.engine.limit_reason() if self.engine is not None else "the model's context is"
        if total >= limit:
            raise ContextLengthError(
                f"the prompt is {total} tokens ({image_tokens} of them for images); {where} {limit} tokens"
            )

    # ---------------------------------------------------------------- forward

    def _stateful_only(self, what: str) -> None:
        if self.engine is not None:
            raise LlavaOvError(f"{what} needs the stateful KV cache: load with kv_cache='stateful'")

    def step(self, token_id: int) -> np.ndarray:
        """One forward of `token_id` after the cached sequence; returns next-token logits (stateful)."""
        self._stateful_only("Pipeline.step")
        self._keys[self.model.kv_len] = token_id  # valid once forward advances kv_len
        return self.model.forward(self.model.embed_tokens(np.array([token_id])))

    def prefill(self, prompt: PreparedPrompt) -> tuple[np.ndarray, int]:
        """Feed what the cache lacks of `prompt`; returns (last logits, reused prefix length) (stateful)."""
        self._stateful_only("Pipeline.prefill")
        reuse = common_prefix(self._keys[: self.model.kv_len], prompt.keys)
        reuse = min(reuse, len(prompt.keys) - 1)  # the last position must run to give logits
        self.model.trim(reuse)
        suffix = prompt.token_ids[reuse:]
        embeds = self.model.embed_tokens(suffix)
        image_mask = prompt.keys[reuse:] < 0
        if image_mask.any():
            visible = image_features_from(prompt, reuse)
            embeds = merge_embeddings(embeds, image_mask, visible)
        try:
            logits = self.model.forward(embeds)
        except BaseException:
            self.reset()
            raise
        self._keys[: len(prompt.keys)] = prompt.keys
        return logits, reuse

    def score(self, messages: Sequence[Message], tokens: Sequence[int]) -> np.ndarray:
        """[len(tokens) + 1, vocab] next-token logits after the prompt and after each of `tokens`."""
        if self.engine is None:
            with self._lock:
                logits, _ = self.prefill(self.prepare(messages))
                rows = [np.array(logits, dtype=np.float32)]
                rows += [np.array(self.step(int(t)), dtype=np.float32) for t in tokens]
            return np.stack(rows)
        prompt = self.prepare(messages)
        self._check_context(prompt)
        if len(prompt.token_ids) + len(tokens) >= self.prompt_limit:
            where = self.engine.limit_reason()
            raise ContextLengthError(
                f"the prompt ({len(prompt.token_ids)} tokens) and the {len(tokens)} tokens to score do not fit: "
                f"{where} {self.prompt_limit} tokens"
            )
        forced = ForcedDecode(tokens)
        handle = self.engine.submit(prompt.keys, prompt.token_ids, *prompt.image_rows(), forced)
        for item in handle:
            if isinstance(item, Failed):
                raise item.error
        if forced.finished != "length" or len(forced.rows) != len(tokens) + 1:
            raise LlavaOvError(f"scoring stopped after {len(forced.rows)} of {len(tokens) + 1} positions (context full?)")
        return np.stack(forced.rows)

    def reset(self) -> None:
        """Forget cached KV: the stateful cache, or the engine's idle prefix blocks."""
        if self.engine is not None:
            self.engine.clear_prefix_cache()
        else:
            self.model.reset()

    def clear_caches(self) -> None:
        """Forget cached KV and cached image features (first-turn measurements)."""
        self.reset()
        with self._lock:
            self._features.clear()

    def close(self) -> None:
        """Stop the engine thread (cancels what runs); the pipeline cannot generate afterwards."""
        if self.engine is not None:
            self.engine.close()

    # ---------------------------------------------------------------- generation

    def stream(
        self,
        prompt: str | Sequence[Message],
        images: Sequence[Any] = (),
        config: GenerationConfig | None = None,
        cancel: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Iterator[StreamChunk]:
        """Yield text pieces as they are decoded; the last chunk has finish_reason and the result.

        `progress(done, total)` is called (in the caller's thread) as prompt chunks are prefilled.
        Closing the iterator early, or setting `cancel`, cancels the generation."""
        config = config or GenerationConfig()
        config.validate()
        messages = as_messages(prompt, images)
        cancel = cancel or threading.Event()
        self._cancels.add(cancel)
        try:
            if self.engine is None:
                with self._lock:
                    yield from self._stream_stateful(messages, config, cancel)
            else:
                yield from self._stream_engine(messages, config, cancel, progress)
        finally:
            self._cancels.discard(cancel)

    def token_bytes(self, token_id: int) -> bytes:
        """A token's text as bytes, for logprobs (thread-safe)."""
        return self.model.tokenizer.token_bytes(token_id)

    def json_constraint(self, schema: dict[str, Any]) -> JsonConstraint:
        """A grammar state for one answer under `schema` (InvalidSchemaError naming what is wrong)."""
        with self._grammars_lock:
            if self._grammars is None:
                vocab = int(self.model.text_config["vocab_size"])
                self._grammars = JsonGrammars.from_export(self.model.export, vocab, self.eos_ids)
        return self._grammars.constraint(schema)

    def _start(self, messages: Sequence[Message], config: GenerationConfig) -> tuple[PreparedPrompt, Timings, DecodeState]:
        timings = Timings()
        # before any image is encoded: a bad schema costs nothing
        constraint = None if config.json_schema is None else self.json_constraint(config.json_schema)
        prompt = self.prepare(messages, config)
        self._check_context(prompt)
        timings.preprocess_s = sum(im.preprocess_s for im in prompt.images)
        timings.vision_s = sum(im.vision_s for im in prompt.images)
        timings.prune_s = sum(im.prune_s for im in prompt.images)
        state = DecodeState(
            self.model.tokenizer.stream(), config, self.eos_ids,
            history=prompt.token_ids.tolist() if config.repetition_penalty != 1.0 else (),
            max_tokens=self.model.max_context - prompt.position_end, constraint=constraint,
        )  # fmt: skip
        return prompt, timings, state

    def _stream_engine(self, messages, config, cancel, progress) -> Iterator[StreamChunk]:
        started = time.perf_counter()
        prompt, timings, state = self._start(messages, config)
        rows, features = prompt.image_rows()
        handle = self.engine.submit(prompt.keys, prompt.token_ids, rows, features, state, cancel, prompt.positions)
        collect = _Collector(prompt, timings, started, constraint=state.constraint)
        try:
            for item in handle:
                if isinstance(item, Progress):
                    if progress is not None:
                        progress(item.done, item.total)
                    continue
                if isinstance(item, Failed):
                    raise item.error
                if item.token_id is not None and collect.tokens == []:
                    timings.queue_s, timings.prefill_s = handle.stats.queue_s, handle.stats.prefill_s
                collect.reused = handle.stats.cached_tokens
                yield collect.chunk(item)
        finally:
            if not handle.done:
                handle.cancel()  # the consumer stopped reading

    def _stream_stateful(self, messages, config, cancel) -> Iterator[StreamChunk]:
        started = time.perf_counter()
        prompt, timings, state = self._start(messages, config)
        prefill_start = time.perf_counter()
        logits, reused = self.prefill(prompt)
        timings.prefill_s = time.perf_counter() - prefill_start
        collect = _Collector(prompt, timings, started, reused, state.constraint)
        while True:
            event = state.cancel() if cancel.is_set() else state.next(logits)
            yield collect.chunk(event)
            if event.finish_reason is not None:
                return
            logits = self.step(event.token_id)

    def generate(self, prompt, images=(), config=None, cancel=None) -> GenerationResult:
        """Run `stream` to the end and return the collected result."""
        for chunk in self.stream(prompt, images, config, cancel):
            if chunk.result is not None:
                return chunk.result
        raise RuntimeError("generation ended without a result")  # unreachable: streams always finish

    def cancel(self) -> None:
        """Stop every running generation, whoever started it, before its next token.

        With several users, give each `stream` call its own cancel Event instead."""
        for event in list(self._cancels):
            event.set()

    def warnings(self) -> list[str]:
        """Things a user must know about this export (e.g. random demo weights)."""
        return self.model.export.notes

    def info(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model.dir),
            "family": self.model.family.model_type,
            "device": self.settings.device,
            "weights": self.model.stored_weights(),  # how each part's weights are stored (fp16, int4_sym g64 r0.6 + int8, ...)
            "vision_encoder": self.model.vision_choice()[1],  # which vision encoder runs and why (INT8-PTQ or float)
            "decode_steps": self.model.decode_why,  # on the main compilation or an f32 one, and why
            "export": self.model.export.info,
            "runtime": self.model.runtime_info(),
        }


class _Collector:
    """Turns TokenEvents into StreamChunks and the final GenerationResult."""

    def __init__(
        self, prompt: PreparedPrompt, timings: Timings, started: float, reused: int = 0,
        constraint: Constraint | None = None,
    ):  # fmt: skip
        self.prompt, self.timings, self.started, self.reused = prompt, timings, started, reused
        self.constraint = constraint
        self.tokens: list[int] = []
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprob] = []

    def chunk(self, event: TokenEvent) -> StreamChunk:
        if event.token_id is not None:
            self.tokens.append(event.token_id)
            if len(self.tokens) == 1:
                self.timings.ttft_s = time.perf_counter() - self.started
            else:
                self.timings.token_s.append(event.time_s)
        self.texts.append(event.text)
        chunk = StreamChunk(event.text, [] if event.token_id is None else [event.token_id], event.finish_reason)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
            chunk.logprobs.append(event.logprob)
        if event.finish_reason is not None:
            if self.constraint is not None:
                self.timings.grammar_s = self.constraint.spent_s
            chunk.result = GenerationResult(
                "".join(self.texts), self.tokens, event.finish_reason, len(self.prompt.token_ids),
                self.prompt.image_tokens, self.reused, self.timings, self.logprobs if self.logprobs else None,
                self.prompt.image_tokens_total,
            )  # fmt: skip
        return chunk


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the shared prefix of two 1-D arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def image_features_from(prompt: PreparedPrompt, start: int) -> list[np.ndarray]:
    """The image features for positions >= start, in order (an image may be cut by the reused prefix)."""
    out, pos = [], 0
    image_iter = iter(prompt.images)
    keys = prompt.keys
    while pos < len(keys):
        if keys[pos] >= 0:
            pos += 1
            continue
        image = next(image_iter)
        end = pos + len(image.features)
        if end > start:
            out.append(image.features[max(0, start - pos) :])
        pos = end
    return out
