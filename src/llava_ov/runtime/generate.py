"""The decode loop: sampling, streaming detokenisation, stop conditions, finish reasons.

`DecodeState` is one sequence's decoding: fed the logits of each forward that reached
its last position, it samples, streams text (token id -> text delta) and returns one
`TokenEvent` per token, the last with a finish reason: "eos", "length", "stop" (a stop
string) or "cancelled". The engine drives one per running sequence; `ForcedDecode` stands
in for it when scoring given tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from llava_ov.errors import LlavaOvError
from llava_ov.runtime.speculative import MAX_PROPOSED, PromptLookup, SpeculationStats

MAX_TOP_LOGPROBS = 20  # OpenAI's bound
MAX_LOGIT_BIAS = 300  # OpenAI's bound on logit_bias entries
MAX_PRUNING = 0.99  # keep at least 1% of the image tokens
MAX_FRAMES = 256  # sampled frames per video (144 tokens each on LLaVA-NeXT-Video: far past any context)
MAX_VIDEO_FPS = 60.0


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # transformers': seen tokens (prompt included) divided / multiplied
    presence_penalty: float = 0.0  # OpenAI's: subtracted from every token the answer already holds
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time the answer already holds the token
    min_p: float = 0.0  # sampling keeps tokens at least this share of the likeliest one's probability; 0: off
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100 bans, +100 forces)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # not while a JSON schema is set: the JSON's end ends the answer
    json_schema: dict | None = None  # constrain the answer to JSON valid under this schema
    regex: str | None = None  # or to text matching this regular expression (whole answer)
    grammar: str | None = None  # or to text this Lark grammar derives (llguidance's dialect)
    tools: list[dict] | None = None  # function definitions for templates that render them (OpenAI's form)
    logprobs: int | None = None  # report each token's logprob and this many (0-20) top alternatives
    prompt_lookup: int = 0  # propose up to this many tokens per step from earlier text (speculative.py); 0: off
    use_draft: bool = True  # let the draft model the pipeline was loaded with propose tokens (runtime/draft.py)
    jump_forward: bool = True  # propose the tokens a grammar forces instead of sampling them one forward each
    max_image_tokens: int | None = None  # the request's images at the largest resolutions within this many tokens
    visual_token_pruning: float = 0.0  # CDPruner: drop this share (0-0.99) of each image's tokens; 0: off
    num_frames: int | None = None  # frames sampled uniformly from each video (None: the model's own count)
    video_fps: float | None = None  # or frames sampled per second of video (not with num_frames)

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0.01 <= self.repetition_penalty <= 100, "repetition_penalty must be in [0.01, 100]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (len(self.logit_bias or {}) <= MAX_LOGIT_BIAS, f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens"),
            (all(-100 <= v <= 100 for v in (self.logit_bias or {}).values()), "logit_bias values must be in [-100, 100]"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs (top alternatives) must be in [0, {MAX_TOP_LOGPROBS}]"),
            (0 <= self.prompt_lookup <= MAX_PROPOSED, f"prompt_lookup must be in [0, {MAX_PROPOSED}]"),
            (self.max_image_tokens is None or self.max_image_tokens >= 1, "max_image_tokens must be >= 1"),
            (0 <= self.visual_token_pruning <= MAX_PRUNING, f"visual_token_pruning must be in [0, {MAX_PRUNING}]"),
            (self.num_frames is None or 1 <= self.num_frames <= MAX_FRAMES, f"num_frames must be in [1, {MAX_FRAMES}]"),
            (self.video_fps is None or 0 < self.video_fps <= MAX_VIDEO_FPS, f"video_fps must be in (0, {MAX_VIDEO_FPS}]"),
            (self.num_frames is None or self.video_fps is None, "num_frames and video_fps exclude each other"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise LlavaOvError(message)
        if sum(v is not None for v in (self.json_schema, self.regex, self.grammar)) > 1:
            raise LlavaOvError("json_schema, regex and grammar exclude each other: constrain an answer one way")
        if self.json_schema is not None:
            from llava_ov.runtime.constrained import check_schema

            check_schema(self.json_schema)
        for kind in ("regex", "grammar"):
            if getattr(self, kind) is not None:
                from llava_ov.runtime.constrained import check_grammar_text

                check_grammar_text(kind, getattr(self, kind))

    @property
    def constraint_spec(self) -> tuple[str, Any] | None:
        """(kind, value) of the grammar the answer is constrained to (constrained.GRAMMAR_KINDS), or None."""
        for kind in ("json_schema", "regex", "grammar"):
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return None


    def check_vocabulary(self, size: int) -> None:
        """logit_bias names tokens of this vocabulary (LlavaOvError naming the first that is not)."""
        bad = [t for t in (self.logit_bias or {}) if not 0 <= t < size]
        if bad:
            raise LlavaOvError(f"logit_bias token {bad[0]} is not in the vocabulary (ids 0..{size - 1})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks the next token from logits: bias and penalties, then greedy or temperature/top-k/top-p/min-p sampling (seeded)."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int], answer: Sequence[int] = ()) -> int:
        """The next token; `history`: the tokens the repetition penalty sees, `answer`: those generated so far."""
        cfg = self.config
        logits = self.adjust(logits, history, answer)
        if cfg.greedy:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64)
        # Shift before dividing: a tiny temperature then sends others to -inf (prob 0), never to nan.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            scores = (scores - scores.max()) / cfg.temperature
        return self._sample(np.nan_to_num(scores, nan=-np.inf))

    def adjust(self, logits: np.ndarray, history: Sequence[int], answer: Sequence[int]) -> np.ndarray:
        """logit_bias, then the repetition, presence and frequency penalties (vLLM's order)."""
        cfg = self.config
        if cfg.logit_bias:
            logits = logits.astype(np.float32, copy=True)
            ids = np.fromiter(cfg.logit_bias, np.int64)
            logits[ids] += np.fromiter(cfg.logit_bias.values(), np.float32)
        if cfg.repetition_penalty != 1.0 and len(history):
            logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
        if (cfg.presence_penalty or cfg.frequency_penalty) and len(answer):
            logits = apply_openai_penalties(logits, answer, cfg.presence_penalty, cfg.frequency_penalty)
        return logits

    def _sample(self, scores: np.ndarray) -> int:
        order, probs = self.distribution(scores)
        return int(order[self.rng.choice(len(order), p=probs)])

    def distribution(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens sampling may pick (likeliest first) and their probabilities, from temperature-scaled
        scores: top-k, then top-p, then min-p (transformers' order of its warpers)."""
        cfg = self.config
        if cfg.top_k and cfg.top_k < scores.size:
            candidates = np.argpartition(-scores, cfg.top_k - 1)[: cfg.top_k]
        else:
            candidates = np.arange(scores.size)
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), cfg.top_p) + 1)  # smallest set with mass >= top_p
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        if cfg.min_p > 0:  # relative to the likeliest token: the same before and after renormalising
            keep = int(np.count_nonzero(probs >= cfg.min_p * probs[0]))
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return order, probs


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """transformers' rule: seen tokens' logits are divided by `penalty` if positive, multiplied if negative."""
    out = logits.astype(np.float32, copy=True)
    seen = np.unique(np.asarray(history, dtype=np.int64))
    seen = seen[(seen >= 0) & (seen < out.size)]
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def apply_openai_penalties(logits: np.ndarray, answer: Sequence[int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's rule over the generated tokens: logit -= presence * (count > 0) + frequency * count."""
    out = logits.astype(np.float32, copy=True)
    ids, counts = np.unique(np.asarray(answer, dtype=np.int64), return_counts=True)
    keep = (ids >= 0) & (ids < out.size)
    out[ids[keep]] -= presence + frequency * counts[keep].astype(np.float32)
    return out


class IncrementalDetokenizer:
    """Turns a growing list of ids into text deltas without broken UTF-8 or lost SentencePiece spaces.

    Decodes a short window of recent ids and emits what the new id added relative
    to the same window without it (vLLM's method): the first piece of a window
    loses its leading space in SentencePiece, so both decodes start at the same id.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self.decode(self.ids[self.prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete UTF-8 sequence or a token that adds no text yet
        delta = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta

    def flush(self) -> str:
        """Text held back at the end (e.g. an incomplete character the model never finished)."""
        full_text = self.decode(self.ids[self.prefix_offset :])
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]


class StopStrings:
    """Finds stop strings in streamed text and holds back text that may start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self.stops:
            return delta, False
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((self._partial(s) for s in self.stops), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _partial(self, stop: str) -> int:
        """Length of the longest suffix of pending text that is a prefix of `stop`."""
        for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:size]):
                return size
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class TokenLogprob:
    """A sampled token's log-probability under the model (log-softmax of its raw logits: before
    temperature, penalty or grammar mask) and the `top` most likely tokens, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    scores = logits.astype(np.float64)
    shifted = scores - scores.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(-logp, top - 1)[:top] if 0 < top < logp.size else np.arange(logp.size if top else 0)
    best = best[np.argsort(-logp[best], kind="stable")]
    return TokenLogprob(int(token), float(logp[token]), [(int(i), float(logp[i])) for i in best])


@dataclass
class TokenEvent:
    token_id: int | None  # None only on a final event that carries no new token
    text: str
    finish_reason: str | None = None
    time_s: float = 0.0  # time to produce this token
    logprob: TokenLogprob | None = None  # when the config asks for logprobs


class TextStream(Protocol):
    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class Proposer(Protocol):
    """Proposes tokens after a context (runtime/draft.py's DraftProposer)."""

    def propose(self, context: np.ndarray, room: int) -> list[int]: ...
    def prepare(self) -> None: ...
    def verified(self, proposed: int, accepted: int) -> None: ...
    def release(self) -> None: ...


class Constraint(Protocol):
    """A grammar over the answer (see `constrained.GrammarConstraint`)."""

    complete: bool
    spent_s: float

    def mask(self, logits: np.ndarray) -> np.ndarray: ...
    def accept(self, token: int) -> None: ...
    def forced_tokens(self) -> list[int]: ...


class DecodeState:
    """One sequence's decoding: sample from its logits, stream its text, decide when it stops.

    The engine calls `next(logits)` once per forward that produced this sequence's logits;
    each call returns the event for one token (or the final event without one)."""

    def __init__(
        self,
        detok: TextStream,
        config: GenerationConfig,
        eos_ids: set[int],
        *,
        history: Sequence[int] = (),
        max_tokens: int | None = None,
        constraint: Constraint | None = None,
        draft: Proposer | None = None,
    ):
        self.sampler = Sampler(config)
        self.constraint = constraint
        self.stops = StopStrings(config.stop)
        self.detok = detok
        self.config = config
        self.eos_ids = eos_ids
        self.limit = min(config.max_new_tokens, max_tokens if max_tokens is not None else config.max_new_tokens)
        self.seen = list(history)  # read by the repetition penalty
        self.answer: list[int] = []  # read by the presence and frequency penalties
        self.produced = 0
        self.finished: str | None = None
        self._last = time.perf_counter()
        self._source: Any = None  # the proposer of the last step's proposals
        self.lookup = PromptLookup(config.prompt_lookup) if config.prompt_lookup else None
        self.draft = draft
        self.speculation = SpeculationStats()

    def proposals(self, context: np.ndarray, room: int) -> list[int]:
        """Tokens for the engine to verify after the last one, at most `room` (speculative.py): the grammar's
        forced tokens (jump-forward), else prompt lookup's from `context` (the keys known so far), else the
        draft model's."""
        room = min(room, MAX_PROPOSED, self.limit - self.produced - 1)
        if room <= 0 or self.finished:
            return []
        self._source = None
        if self.constraint is not None and self.config.jump_forward:
            forced = self.constraint.forced_tokens()
            if forced:
                return forced[:room]
        for source in (self.lookup, self.draft):
            tokens = source.propose(context, room) if source is not None else []
            if tokens:
                self._source = source
                return tokens
        return []

    def prepare_proposals(self) -> None:
        """Called while the prompt prefills: the draft model prefills its own prompt (a chunk a step)."""
        if self.draft is not None:
            self.draft.prepare()

    def verified(self, proposed: int, accepted: int) -> None:
        """How many of the last step's proposals were kept (the proposer that made them learns from it)."""
        self.speculation.add(proposed, accepted)
        if self._source is not None:
            self._source.verified(proposed, accepted)

    def release(self) -> None:
        """The answer ended: give back what its proposers hold (the draft's KV blocks)."""
        if self.draft is not None:
            self.draft.release()

    def _final(self, reason: str) -> TokenEvent:
        self.finished = reason
        return TokenEvent(None, self.stops.feed(self.detok.flush())[0] + self.stops.flush(), reason)

    def cancel(self) -> TokenEvent:
        return self._final("cancelled")

    def next(self, logits: np.ndarray) -> TokenEvent:
        """Sample the next token from `logits`; the event's finish_reason says whether to go on."""
        allowed = logits if self.constraint is None else self.constraint.mask(logits)
        token = self.sampler(allowed, self.seen, self.answer)
        if token in self.eos_ids and (self.constraint is not None or not self.config.ignore_eos):
            return self._final("eos")
        if self.constraint is not None:
            self.constraint.accept(token)
        logprob = None if self.config.logprobs is None else token_logprob(logits, token, self.config.logprobs)
        self.produced += 1
        self.seen.append(token)
        self.answer.append(token)
        text, stopped = self.stops.feed(self.detok.push(token))
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        if stopped:
            self.finished = "stop"
        elif self.constraint is not None and self.constraint.complete:
            self.finished = "eos"  # the JSON has ended: only the end of the answer could follow
        elif self.produced >= self.limit:
            self.finished = "length"
        if self.finished in ("eos", "length"):
            text += self.stops.feed(self.detok.flush())[0] + self.stops.flush()
        return TokenEvent(token, text, self.finished, elapsed, logprob)


class ForcedDecode:
    """Feeds the given tokens instead of sampling and keeps the logits of every step (scoring).

    Stands in for a DecodeState: the engine runs it like any other sequence."""

    def __init__(self, tokens: Sequence[int]):
        self.tokens = [int(t) for t in tokens]
        self.limit = len(self.tokens) + 1
        self.rows: list[np.ndarray] = []
        self.finished: str | None = None

    def next(self, logits: np.ndarray) -> TokenEvent:
        self.rows.append(np.array(logits, dtype=np.float32))
        if len(self.rows) > len(self.tokens) or len(self.rows) >= self.limit:  # all scored, or no room left
            self.finished = "length"
            return TokenEvent(None, "", "length")
        return TokenEvent(self.tokens[len(self.rows) - 1], "")

    def proposals(self, context: np.ndarray, room: int) -> list[int]:
        return []  # scoring keeps every step's logits: one token per forward

    def prepare_proposals(self) -> None:
        pass

    def verified(self, proposed: int, accepted: int) -> None:
        pass

    def release(self) -> None:
        pass

    def cancel(self) -> TokenEvent:
        self.finished = "cancelled"
        return TokenEvent(None, "", "cancelled")
